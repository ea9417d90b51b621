"""Bundle building: one gzip tar per (model, version, device class), a TUF target the agents install.

Theory: a bundle carries everything an agent needs to decide, without the cloud, whether a model works on its
device: `manifest.json` (a `protos.messages.Manifest`: signature, budgets of the class, sha256 and size of every
other member), `model.onnx`, and a smoke test: `smoke/input.npz`, a deterministic seeded sample with one array per
model input (in the input's dtype: a float64 model gets float64), and `smoke/expected.npz`, the outputs ONNX Runtime
computes for it here (a reduced-precision model's integer label outputs left out: `smoke_expected`). The agent runs
the input before activation and compares within the manifest's tolerances. A bundle the `Fleet` builds also carries
`provenance.dsse.json`, a signed in-toto statement of how its model was made (`cloud/provenance.py`); the agent
checks its hash like any member's and otherwise ignores it.

The archive is byte-for-byte deterministic for the same inputs (fixed member order, mtimes from `created_at`, owner
0, mode 0644, gzip header without name or time, npz members with a fixed date), so building the same bundle twice
(two replicas, a retry) gives the same TUF target hash. Regular files only: the agent's unpacker refuses anything
else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zipfile
from datetime import datetime, timezone

import numpy as np

from edgefleet.cloud.errors import Invalid
from edgefleet.protos.messages import DeviceClassInfo, FileEntry, Manifest, SmokeTest, TensorSpec
from edgefleet.protos.provenance import PROVENANCE_FILE

MODEL_FILE = "model.onnx"
TFLITE_MODEL_FILE = "model.tflite"  # a LiteRT variant built by a distillation job
SMOKE_INPUT = "smoke/input.npz"
SMOKE_EXPECTED = "smoke/expected.npz"
MANIFEST_FILE = "manifest.json"
SMOKE_SEED = 20240601  # fixed: the same model always gets the same smoke input
# Dynamic dimensions (batch, sequence length, ...) become 1: the smallest input every model must accept.
DYNAMIC_DIM = 1
# 1e-3 relative / 1e-4 absolute: fp32 results differ across CPUs and EPs by reduction order, well inside this.
SMOKE_RTOL = 1e-3
SMOKE_ATOL = 1e-4
# Reduced precision differs across CPUs and EPs by more: fp16 accumulates in different orders (a few ulp of 1e-3),
# and an int8 result may land one quantization step away on another kernel (ARM vs x86 requantization rounding).
SMOKE_TOLERANCES = {"fp32": (SMOKE_RTOL, SMOKE_ATOL), "fp16": (1e-2, 1e-2), "int8": (5e-2, 5e-2)}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def target_path(model: str, version: int, device_class: str) -> str:
    """The TUF target path of a bundle (also its URL under /tuf/targets/)."""
    return f"bundles/{model}/v{version}/{device_class}.tar.gz"


def model_file_for(model_format: str) -> str:
    """The bundle member that holds a model of this format."""
    return TFLITE_MODEL_FILE if model_format == "tflite" else MODEL_FILE


def smoke_inputs(inputs: list[TensorSpec], seed: int = SMOKE_SEED) -> dict[str, np.ndarray]:
    """One deterministic array per input: floats from a seeded normal, integers zero, booleans false.

    Integer inputs are usually indices (token ids, categories) whose valid range the model does not declare;
    zero is valid for every embedding table and one-hot encoder.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = tuple(d if isinstance(d, int) and d >= 0 else DYNAMIC_DIM for d in spec.shape)
        if spec.dtype == "str":
            arrays[spec.name] = np.full(shape, "a", dtype="<U1")
            continue
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError:
            raise Invalid(f"input {spec.name!r}: unknown dtype {spec.dtype!r}") from None
        if np.issubdtype(dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arrays[spec.name] = np.zeros(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            arrays[spec.name] = np.zeros(shape, dtype=dtype)
        else:
            raise Invalid(f"input {spec.name!r}: no smoke input can be made for dtype {spec.dtype!r}")
    return arrays


def run_reference(model_bytes: bytes, feeds: dict[str, np.ndarray], outputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The expected outputs: ONNX Runtime on the CPU, the reference every execution provider is compared to."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Deterministic reference: one thread avoids run-to-run differences from parallel reductions.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        results = session.run([o.name for o in outputs], feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        text = " ".join(str(exc).split())[:400]
        raise Invalid(
            f"smoke run failed: ONNX Runtime could not run the model on its sample input (dynamic dimensions set to "
            f"{DYNAMIC_DIM}, integer inputs 0): {text}"
        ) from None
    out: dict[str, np.ndarray] = {}
    for spec, value in zip(outputs, results, strict=True):
        array = np.asarray(value)
        if array.dtype == object:  # string tensors come back as object arrays; npz must not need pickle
            array = array.astype(str)
        out[spec.name] = array
    return out


def run_reference_litert(model_bytes: bytes, feeds: dict[str, np.ndarray],
                         outputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Expected outputs of a TFLite model, with the agent's own LiteRT runtime, which answers under the manifest's
    names (by signature name, else by position: `common/runtimes/litert.py`), as a device will."""
    from edgefleet.common.errors import EdgefleetError
    from edgefleet.common.runtimes.litert import LiteRtRuntime

    runtime = LiteRtRuntime(intra_op_threads=1)
    try:
        runtime.load_bytes(model_bytes, list(feeds), [o.name for o in outputs])
        results = runtime.run(feeds)
    except EdgefleetError as exc:  # RuntimeLoadError when LiteRT is missing here, InferenceError on bad input
        raise Invalid(f"smoke run failed: LiteRT could not run the model on its sample input here ({exc}); install "
                      "'edgefleet[litert]' in the cloud, or give the version its expected outputs") from None
    finally:
        runtime.close()
    return {spec.name: np.asarray(results[spec.name]) for spec in outputs}


def smoke_expected(expected: dict[str, np.ndarray], outputs: list[TensorSpec], precision: str) -> dict[str, np.ndarray]:
    """The expected outputs a bundle carries. A reduced-precision model's integer outputs (a class label: the argmax
    of its scores) are left out: another CPU's int8/fp16 kernels may move a score by a quantization step, which
    flips a near-tie label although the model is fine; the scores beside it are still compared within tolerance."""
    if precision == "fp32":
        return expected
    ints = {o.name for o in outputs if o.dtype.startswith(("int", "uint")) or o.dtype == "bool"}
    kept = {name: value for name, value in expected.items() if name not in ints}
    return kept or expected


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz that `np.load` reads, with fixed member dates and order (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _tar_gz(members: list[tuple[str, bytes]], mtime: int) -> bytes:
    raw = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of the build's name and time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = mtime
                info.type = tarfile.REGTYPE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def build_bundle(
    model_bytes: bytes,
    *,
    name: str,
    version: int,
    device_class: DeviceClassInfo,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    created_at: datetime,
    precision: str = "fp32",
    runtime: str = "onnxruntime",
    model_format: str = "onnx",
    expected: dict[str, np.ndarray] | None = None,
    provenance: bytes | None = None,
) -> tuple[bytes, Manifest]:
    """The archive bytes and its manifest; raises Invalid when the model cannot be bundled for this class.

    A pushed model is fp32 ONNX for ONNX Runtime (the defaults). A distilled variant says its precision, runtime
    and format; a TFLite one becomes `model.tflite`. `expected`: smoke outputs computed elsewhere (a TFLite
    variant's, by the worker that built it); otherwise they are computed here with the variant's runtime.
    `provenance`: the signed DSSE envelope about the model file (`cloud/provenance.py`), carried as
    `provenance.dsse.json` and listed in the manifest like every other member.
    """
    if runtime != "onnxruntime" and runtime not in device_class.runtimes:
        raise Invalid(
            f"cannot build {name} v{version} for class {device_class.name}: the version runs on {runtime}, and "
            f"the class runs {', '.join(device_class.runtimes)}"
        )
    if runtime == "onnxruntime" and "onnxruntime" not in device_class.runtimes:
        raise Invalid(
            f"cannot build {name} v{version} for class {device_class.name}: the class runs "
            f"{', '.join(device_class.runtimes)}, and edgefleet builds ONNX Runtime bundles only so far; add "
            "'onnxruntime' to the class's runtimes if the devices have it"
        )
    size_mb = len(model_bytes) / (1024 * 1024)
    limit = device_class.budgets.model_mb
    if limit is not None and size_mb > limit:
        raise Invalid(
            f"cannot build {name} v{version} for class {device_class.name}: the model is {size_mb:.1f} MB, over the "
            f"class's {limit:g} MB model budget; deploy a smaller model or raise budgets.model_mb for the class"
        )
    feeds = smoke_inputs(inputs)
    if expected is None:
        run = run_reference_litert if model_format == "tflite" else run_reference
        expected = run(model_bytes, feeds, outputs)
    expected = smoke_expected(expected, outputs, precision)
    model_file = model_file_for(model_format)
    rtol, atol = SMOKE_TOLERANCES.get(precision, (SMOKE_RTOL, SMOKE_ATOL))
    members = [
        (model_file, model_bytes),
        (SMOKE_EXPECTED, write_npz(expected)),
        (SMOKE_INPUT, write_npz(feeds)),
    ]
    if provenance is not None:
        members.append((PROVENANCE_FILE, provenance))
    if created_at.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    manifest = Manifest(
        name=name,
        version=version,
        device_class=device_class.name,
        runtime=runtime,
        execution_providers=device_class.execution_providers,
        # A pushed model is carried as is (fp32 from every common exporter); a distilled variant was converted
        # for its class by the job that built it.
        precision=precision,
        model_file=model_file,
        inputs=inputs,
        outputs=outputs,
        files=[FileEntry(path=p, sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for p, d in members],
        budgets=device_class.budgets,
        smoke_test=SmokeTest(input_file=SMOKE_INPUT, expected_file=SMOKE_EXPECTED, rtol=rtol, atol=atol),
        created_at=created_at.astimezone(timezone.utc),
        emulation_factor=_emulation_factor(model_bytes, model_format, inputs, device_class, precision, runtime),
    )
    mtime = int(created_at.timestamp())
    # manifest.json first: a streaming reader learns what to expect before the large members arrive.
    archive = _tar_gz([(MANIFEST_FILE, manifest.to_wire())] + sorted(members), mtime)
    return archive, manifest


def _emulation_factor(model_bytes: bytes, model_format: str, inputs: list[TensorSpec], device_class: DeviceClassInfo,
                      precision: str, runtime: str) -> float | None:
    """The cost model's slowdown of this class against the build machine for this model (costmodel.emulation_factor),
    for agents that emulate their class; None for a TFLite file or a model the counter cannot read."""
    if model_format != "onnx":
        return None
    from edgefleet.cloud.distill.costmodel import emulation_factor

    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inputs[0].shape]
    return emulation_factor(model_bytes, shape, device_class, precision, runtime)


__all__ = ["build_bundle", "model_file_for", "read_npz", "run_reference", "run_reference_litert", "smoke_expected",
           "smoke_inputs", "target_path", "write_npz"]
