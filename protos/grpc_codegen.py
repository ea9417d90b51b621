"""Regenerates the committed gRPC modules of the Open Inference Protocol from `grpc_predict_v2.proto`.

    python -m edgefleet.protos.grpc_codegen           write grpc_predict_v2_pb2.py, _pb2.pyi, _pb2_grpc.py here
    python -m edgefleet.protos.grpc_codegen --check   exit 1 (naming the files) when the committed ones differ

Theory: the cloud serves `inference.GRPCInferenceService` from KServe's proto, kept verbatim next to this file. The
modules protoc makes from it are committed, so an install needs the protobuf and grpcio runtimes only, never
grpcio-tools (a dev dependency, used here). tests/protos/test_grpc_codegen.py regenerates them and asserts they
equal the committed files, so the proto and its modules cannot drift apart.

protoc's output is fixed up in two ways, both textual and both checked by that test:

1. Imports in package form (`from edgefleet.protos import grpc_predict_v2_pb2`): protoc writes a top-level
   `import grpc_predict_v2_pb2`, which only works with protos/ on sys.path.
2. A descriptor pool of its own instead of protobuf's default one. tritonclient (`grpc_service.proto`) and MLServer
   (`dataplane.proto`) define the same package `inference`, and the default pool refuses a second
   `inference.ModelInferRequest` ("duplicate symbol"), so without this a process (a test run, a benchmark, an app)
   could not import our server and either client at once. The wire format is unaffected: messages are the same
   bytes whichever pool describes them.

The generated files are marked for ruff and mypy to skip: they are protoc's code, not ours to restyle.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_predict_v2.proto"
MODULES = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
_PACKAGE = "edgefleet.protos"
_SKIP_LINT = "# ruff: noqa\n# mypy: ignore-errors\n"
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = ("# Its own pool, not Default(): tritonclient and MLServer define package `inference` too (grpc_codegen).\n"
             "_POOL = _descriptor_pool.DescriptorPool()\n"
             "DESCRIPTOR = _POOL.AddSerializedFile(")


class CodegenError(RuntimeError):
    """protoc failed, or its output no longer has the shape the fix-ups expect."""


def generate(proto_dir: Path = HERE) -> dict[str, str]:
    """The three modules, fixed up, as {file name: text}; writes nothing."""
    try:
        # A dev dependency, only this tool needs it; imported by name, as it ships no type information.
        protoc = importlib.import_module("grpc_tools.protoc")
    except ImportError:
        raise CodegenError("grpcio-tools is not installed; `pip install -e .[dev]` brings it") from None
    with tempfile.TemporaryDirectory() as tmp:
        code: int = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                            f"--grpc_python_out={tmp}", str(proto_dir / PROTO)])
        if code != 0:
            raise CodegenError(f"protoc failed on {proto_dir / PROTO} (exit {code}); its message is above")
        raw = {name: (Path(tmp) / name).read_text(encoding="utf-8") for name in MODULES}
    return {name: _fix(name, text) for name, text in raw.items()}


def _fix(name: str, text: str) -> str:
    if name == "grpc_predict_v2_pb2.py":
        if text.count(_DEFAULT_POOL) != 1:
            raise CodegenError(f"{name}: protoc's output no longer adds the file to the default pool in one line; "
                               "update grpc_codegen.py's fix-up for this protobuf release")
        text = text.replace(_DEFAULT_POOL, _OWN_POOL)
    if name == "grpc_predict_v2_pb2_grpc.py":
        plain = "import grpc_predict_v2_pb2 as grpc__predict__v2__pb2\n"
        if text.count(plain) != 1:
            raise CodegenError(f"{name}: protoc's import of the messages module changed; update grpc_codegen.py")
        text = text.replace(plain, f"from {_PACKAGE} import grpc_predict_v2_pb2 as grpc__predict__v2__pb2\n")
    return _SKIP_LINT + text


def stale(proto_dir: Path = HERE) -> list[str]:
    """The committed modules that differ from what `generate` makes now (missing ones included)."""
    return stale_files(generate(proto_dir), proto_dir)


def stale_files(fresh: dict[str, str], proto_dir: Path) -> list[str]:
    """Of `fresh` ({file name: text}), the files in `proto_dir` that are missing or differ."""
    return [name for name, text in fresh.items()
            if not (proto_dir / name).exists() or (proto_dir / name).read_text(encoding="utf-8") != text]


def codegen_cli(module: str, doc: str | None, generate: Callable[[], dict[str, str]], out_dir: Path,
                argv: list[str] | None) -> int:
    """`python -m MODULE [--check]` for a codegen module: write what `generate` makes into `out_dir`, or with
    --check exit 1 naming the files that differ; 2 on a CodegenError."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            differ = stale_files(generate(), out_dir)
            if differ:
                print(f"out of date: {', '.join(differ)}; run `python -m {module}`", file=sys.stderr)
                return 1
            return 0
        for name, text in generate().items():
            (out_dir / name).write_text(text, encoding="utf-8")
            print(f"wrote {out_dir / name}")
    except CodegenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return codegen_cli("edgefleet.protos.grpc_codegen", __doc__, generate, HERE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
