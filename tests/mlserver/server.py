"""A real MLServer process on free ports, serving ONNX files through tests/mlserver/onnx_runtime.py.

Theory: the offload target is "any OIP server", so the tests run one we did not write, exactly as an operator
would: `mlserver start <repository>` from MLServer's own venv (tests/mlserver/env.py), a settings.json with a free
HTTP port and a free gRPC port, one folder per model with its model-settings.json and model.onnx, and the runtime
class copied to the repository root (which `mlserver start` puts on sys.path). The model settings carry the ONNX
file's signature as OIP metadata, so `GET /v2/models/{name}` answers what Triton would.

Defaults: `parallel_workers: 0` (inference in the server process: MLServer's inference pool would start one more
Python per worker, 2-3 s each, and on 2 cores it buys nothing), `debug: false` (no access log per request, as in
production), the metrics server off unless asked. The process runs in its own session, so `stop()` ends its whole
process group (MLServer's workers too) by its own PID, SIGTERM first, and checks that the group is gone.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import free_port, wait_for
from tests.mlserver.env import MLServerEnv, MLServerUnavailable

RUNTIME = Path(__file__).with_name("onnx_runtime.py")
START_TIMEOUT_S = 90.0  # measured 1.1-1.3 s on the 2-core machine (2.2-2.5 s with a worker); a loaded one needs more
STOP_TIMEOUT_S = 20.0
_ORT_TO_OIP = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32",
               "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL", "tensor(float16)": "FP16"}


@dataclass
class MLServerHandle:
    proc: subprocess.Popen
    workdir: Path
    http_port: int
    grpc_port: int
    metrics_port: int | None
    models: dict[str, Path]
    start_s: float  # from Popen to every model ready
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to MLServer's process group, SIGKILL after STOP_TIMEOUT_S; raises if anything of it is left."""
        if self._stopped:
            return
        self._stopped = True
        pgid = self.proc.pid  # start_new_session: the group is the one our child leads
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)
        wait_for(lambda: not _group_alive(pgid), timeout_s=STOP_TIMEOUT_S, what=f"MLServer's process group {pgid} "
                 "to be gone")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signature(model_path: Path) -> tuple[list[dict], list[dict]]:
    """The ONNX file's tensors as MLServer model-settings metadata (name, OIP datatype, shape with -1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def meta(args) -> list[dict]:
        return [{"name": a.name, "datatype": _ORT_TO_OIP.get(a.type, a.type),
                 "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]

    return meta(session.get_inputs()), meta(session.get_outputs())


def _write_repository(workdir: Path, models: dict[str, Path], http_port: int, grpc_port: int,
                      metrics_port: int | None, parallel_workers: int, debug: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RUNTIME, workdir / "onnx_runtime.py")
    settings = {"debug": debug, "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
                "parallel_workers": parallel_workers, "metrics_endpoint": "/metrics" if metrics_port else None,
                "metrics_port": metrics_port or 0, "metrics_dir": str(workdir / ".metrics"),
                "environments_dir": str(workdir / ".envs"), "load_models_at_startup": True}
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2))
    for name, path in models.items():
        folder = workdir / name
        folder.mkdir(exist_ok=True)
        shutil.copyfile(path, folder / "model.onnx")
        inputs, outputs = _signature(path)
        doc = {"name": name, "implementation": "onnx_runtime.ONNXRuntime", "inputs": inputs, "outputs": outputs,
               "parameters": {"uri": "./model.onnx", "version": "1"}}
        (folder / "model-settings.json").write_text(json.dumps(doc, indent=2))


def _ready(port: int, names: list[str]) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        for path in ["/v2/health/ready", *(f"/v2/models/{n}/ready" for n in names)]:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                return False
        return True
    finally:
        conn.close()


def start_mlserver(model_path: Path | str, name: str, workdir: Path | str, *,
                   more_models: dict[str, Path] | None = None, parallel_workers: int = 0, metrics: bool = False,
                   debug: bool = False, env: MLServerEnv | None = None,
                   timeout_s: float = START_TIMEOUT_S) -> MLServerHandle:
    """MLServer serving `model_path` as `name` (and `more_models`), ready; the caller must `stop()` it.
    `debug`: MLServer's own default (true) logs every request; off here, as in production."""
    env = env or MLServerEnv()
    env.ensure()
    workdir = Path(workdir)
    models = {name: Path(model_path), **{k: Path(v) for k, v in (more_models or {}).items()}}
    http_port, grpc_port = free_port(), free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    metrics_port = free_port() if metrics else None
    _write_repository(workdir, models, http_port, grpc_port, metrics_port, parallel_workers, debug)
    log_path = workdir / "mlserver.log"
    child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    child_env["PYTHONNOUSERSITE"] = "1"  # our user site (numpy 2 etc.) must not leak into MLServer's interpreter
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(env.mlserver), "start", str(workdir)], cwd=workdir, env=child_env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    handle = MLServerHandle(proc, workdir, http_port, grpc_port, metrics_port, models, 0.0, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise MLServerUnavailable(f"mlserver start exited with {proc.returncode} before it was ready; its log "
                                      f"({log_path}) ends:\n{handle.log_tail()}")
        return _ready(http_port, list(models))

    try:
        deadline = time.monotonic() + timeout_s
        while not _poll(up):
            if time.monotonic() > deadline:
                raise MLServerUnavailable(f"MLServer did not become ready within {timeout_s:.0f} s on port "
                                          f"{http_port}; its log ({log_path}) ends:\n{handle.log_tail()}")
            time.sleep(0.05)  # polling a server that is still importing; bounded by the deadline
    except BaseException:
        handle.stop()
        raise
    handle.start_s = time.monotonic() - start
    return handle


def _poll(up) -> bool:
    try:
        return up()
    except (OSError, http.client.HTTPException):
        return False  # not listening yet


__all__ = ["MLServerHandle", "START_TIMEOUT_S", "start_mlserver"]
