"""protos/grpc_codegen.py: the committed gRPC modules are exactly what the committed proto compiles to, import in
package form, stay out of the lean import path, and share a process with tritonclient's copy of package
`inference`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgefleet.protos import grpc_codegen

PROTOS = Path(grpc_codegen.__file__).resolve().parent


def test_regenerating_gives_exactly_the_committed_files():
    fresh = grpc_codegen.generate()
    assert sorted(fresh) == sorted(grpc_codegen.MODULES)
    for name, text in fresh.items():
        committed = (PROTOS / name).read_text(encoding="utf-8")
        assert committed == text, f"{name} is stale: run `python -m edgefleet.protos.grpc_codegen`"
    assert grpc_codegen.main(["--check"]) == 0


def test_check_names_a_stale_module(tmp_path):
    (tmp_path / grpc_codegen.PROTO).write_bytes((PROTOS / grpc_codegen.PROTO).read_bytes())
    for name, text in grpc_codegen.generate().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert grpc_codegen.stale(tmp_path) == []
    (tmp_path / "grpc_predict_v2_pb2_grpc.py").write_text("# edited by hand\n", encoding="utf-8")
    (tmp_path / "grpc_predict_v2_pb2.pyi").unlink()
    assert grpc_codegen.stale(tmp_path) == ["grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"]


def test_the_proto_is_kserves_with_its_licence():
    text = (PROTOS / grpc_codegen.PROTO).read_text(encoding="utf-8")
    assert text.startswith("// Copyright 2020 kubeflow.org.\n//\n// Licensed under the Apache License, Version 2.0")
    from edgefleet.protos import grpc_predict_v2_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert (pb.DESCRIPTOR.package, service.full_name) == ("inference", "inference.GRPCInferenceService")
    assert [m.name for m in service.methods] == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                 "ModelMetadata", "ModelInfer"]
    fields = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    assert list(fields) == ["bool_contents", "int_contents", "int64_contents", "uint_contents",
                            "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"]


def test_generated_modules_import_in_package_form():
    text = (PROTOS / "grpc_predict_v2_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from edgefleet.protos import grpc_predict_v2_pb2 as grpc__predict__v2__pb2\n" in text
    assert "\nimport grpc_predict_v2_pb2" not in text


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_lean_import_path_never_loads_protobuf_or_grpc():
    run = _python("import sys\nimport edgefleet.protos, edgefleet.protos.messages, edgefleet.protos.oip\n"
                  "print(sorted(m for m in sys.modules if m.startswith(('google.protobuf', 'grpc'))))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_ours_and_tritonclients_package_inference_share_one_process():
    for first, second in (("edgefleet.protos.grpc_predict_v2_pb2_grpc", "tritonclient.grpc"),
                          ("tritonclient.grpc", "edgefleet.protos.grpc_predict_v2_pb2_grpc")):
        run = _python(f"import {first}\nimport {second}\n"
                      "from edgefleet.protos import grpc_predict_v2_pb2 as pb\n"
                      "from tritonclient.grpc import service_pb2 as triton\n"
                      "wire = pb.ModelInferRequest(model_name='m', raw_input_contents=[b'ab']).SerializeToString()\n"
                      "print(triton.ModelInferRequest.FromString(wire).model_name)")
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "m"
