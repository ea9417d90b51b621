"""Regenerates the committed gRPC modules of the agent channel from `agent_channel.proto`.

    python -m edgefleet.protos.agent_channel_codegen           write agent_channel_pb2.py, _pb2.pyi, _pb2_grpc.py
    python -m edgefleet.protos.agent_channel_codegen --check   exit 1 (naming the files) when the committed differ

Theory: the same as protos/grpc_codegen.py for the Open Inference Protocol. The modules protoc makes are committed,
so an install needs the protobuf and grpcio runtimes only (the agent's `grpc` extra, the cloud's), never
grpcio-tools; tests/cloud/test_agent_channel.py regenerates them and asserts they equal the committed files. One
fix-up: the import in package form (`from edgefleet.protos import agent_channel_pb2`). Package `edgefleet.v1` is
ours alone, so protobuf's default descriptor pool is kept (the OIP modules need a pool of their own only because
tritonclient and MLServer define `inference` too).
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

from edgefleet.protos.grpc_codegen import CodegenError, codegen_cli, stale_files

HERE = Path(__file__).resolve().parent
PROTO = "agent_channel.proto"
MODULES = ("agent_channel_pb2.py", "agent_channel_pb2.pyi", "agent_channel_pb2_grpc.py")
_SKIP_LINT = "# ruff: noqa\n# mypy: ignore-errors\n"
_PLAIN_IMPORT = "import agent_channel_pb2 as agent__channel__pb2\n"
_PACKAGE_IMPORT = "from edgefleet.protos import agent_channel_pb2 as agent__channel__pb2\n"


def generate(proto_dir: Path = HERE) -> dict[str, str]:
    """The three modules, fixed up, as {file name: text}; writes nothing."""
    try:
        protoc = importlib.import_module("grpc_tools.protoc")  # a dev dependency; ships no type information
    except ImportError:
        raise CodegenError("grpcio-tools is not installed; `pip install -e .[dev]` brings it") from None
    with tempfile.TemporaryDirectory() as tmp:
        code: int = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                                 f"--grpc_python_out={tmp}", str(proto_dir / PROTO)])
        if code != 0:
            raise CodegenError(f"protoc failed on {proto_dir / PROTO} (exit {code}); its message is above")
        raw = {name: (Path(tmp) / name).read_text(encoding="utf-8") for name in MODULES}
    out = {}
    for name, text in raw.items():
        if name.endswith("_grpc.py"):
            if text.count(_PLAIN_IMPORT) != 1:
                raise CodegenError(f"{name}: protoc's import of the messages module changed; update "
                                   "agent_channel_codegen.py")
            text = text.replace(_PLAIN_IMPORT, _PACKAGE_IMPORT)
        out[name] = _SKIP_LINT + text
    return out


def stale(proto_dir: Path = HERE) -> list[str]:
    """The committed modules that differ from what `generate` makes now (missing ones included)."""
    return stale_files(generate(proto_dir), proto_dir)


def main(argv: list[str] | None = None) -> int:
    return codegen_cli("edgefleet.protos.agent_channel_codegen", __doc__, generate, HERE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
