"""ONNX -> TFLite through onnx2tf. Runs with the converter venv's python (TensorFlow, numpy 1.26), never imported by
edgefleet itself: it imports nothing of edgefleet and talks through files and its exit status.

    python _tflite_convert.py MODEL.onnx OUT.tflite --precision fp32|int8 [--calib CALIB.npy]

Layout: onnx2tf turns NCHW inputs into NHWC by default; every input of rank 3 or more is named in
`keep_ncw_or_nchw_or_ncdhw_input_names`, so the .tflite takes the same arrays as the ONNX model (one bundle smoke
input serves both). int8 is per-channel full-integer quantization with float32 input and output
(`*_integer_quant.tflite`), calibrated on CALIB.npy (transfer-set samples in the ONNX layout; mean 0, std 1 so onnx2tf
feeds them unchanged). Calibration file: onnx2tf downloads MS-COCO samples
(`calibration_image_sample_data_20x128x128x3_float32.npy`) from GitHub when it quantizes a 4-D input without
`custom_input_op_name_np_data_path`, or tests a static-batch 3-channel image input; it reads the file from the
working directory first. The caller runs us in a work directory where that file is already written, and we always
pass our own calibration data, so no download is ever attempted. Exit 0 and OUT written, or exit 2 with the reason
on stderr.
"""

import argparse
import os
import shutil
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("onnx")
    parser.add_argument("out")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--calib")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import onnx
    import onnx2tf

    model = onnx.load(args.onnx)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    keep_layout = [i.name for i in inputs if len(i.type.tensor_type.shape.dim) >= 3]
    folder = os.path.join(os.path.dirname(os.path.abspath(args.out)), "onnx2tf_out")
    kwargs = dict(input_onnx_file_path=args.onnx, output_folder_path=folder, non_verbose=True,
                  keep_ncw_or_nchw_or_ncdhw_input_names=keep_layout or None)
    if args.precision == "int8":
        if not args.calib or len(inputs) != 1:
            print("int8 conversion needs --calib and a model with exactly one input", file=sys.stderr)
            return 2
        kwargs.update(output_integer_quantized_tflite=True, quant_type="per-channel",
                      custom_input_op_name_np_data_path=[[inputs[0].name, os.path.abspath(args.calib), 0.0, 1.0]])
    try:
        onnx2tf.convert(**kwargs)
    except SystemExit as exc:  # onnx2tf reports many problems with sys.exit(1) after logging them
        print(f"onnx2tf stopped with exit status {exc.code}", file=sys.stderr)
        return 2
    stem = os.path.splitext(os.path.basename(args.onnx))[0]
    suffix = "_integer_quant.tflite" if args.precision == "int8" else "_float32.tflite"
    produced = os.path.join(folder, stem + suffix)
    if not os.path.isfile(produced):
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        print(f"onnx2tf finished but wrote no {stem + suffix}; found: {found}", file=sys.stderr)
        return 2
    shutil.copyfile(produced, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
