"""What metering costs: each reader's read over the fixture boards, the sampler thread's CPU share, the hot path.

    .venv/bin/python bench/energy_meters.py [--seconds 3] [--json] [--zeus-python /tmp/zeusvenv/bin/python]

Measures, on this machine, against the fixture trees in tests/fixtures/energy (real sysfs reads through the page
cache, as on a board; the sensor's own conversion time is not in them):
1. per-read cost of every reader: RAPL `read_j` (package + dram), INA3221 `read_w` (Orin hwmon, Nano ina3221x), the
   Pi 5 PMIC parse of recorded `vcgencmd` output, and the fork+exec of a trivial process as a stand-in for what
   running vcgencmd per sample adds (vcgencmd itself is not on this machine);
2. the one sampler thread's CPU share at 10 Hz and 100 Hz over the Orin rails (process CPU time over wall time,
   less the same idle wait without a sampler);
3. the inference hot path (`InferenceService.run` over a no-op runtime, telemetry recording) with no meter, the
   modelled meter, and a window meter (RAPL) with a sampler thread running beside it;
4. with `--zeus-python`, the same RAPL tree read through zeus (installed in that interpreter's venv): its
   install weight, import cost, processes it starts, per-read cost and its answer across a wraparound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.edge_agent.inference import InferenceService, Loaded  # noqa: E402
from edgefleet.edge_agent.meters import ModelledMeter, NullMeter  # noqa: E402
from edgefleet.edge_agent.meters.ina3221 import Ina3221Rails  # noqa: E402
from edgefleet.edge_agent.meters.pi5_pmic import parse_pmic_adc  # noqa: E402
from edgefleet.edge_agent.meters.rapl import RaplMeter  # noqa: E402
from edgefleet.edge_agent.meters.sampler import SampledMeter  # noqa: E402
from edgefleet.edge_agent.outbox import Outbox  # noqa: E402
from edgefleet.edge_agent.telemetry import Telemetry  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "energy"


def per_call_us(fn, min_s: float = 0.3) -> float:
    """Mean microseconds per call over at least `min_s` seconds."""
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(100):
            fn()
        n += 100
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / n * 1e6


def readers(trees: Path) -> dict[str, float]:
    pmic_text = (FIXTURES / "raspberry-pi-5" / "vcgencmd_pmic_read_adc.txt").read_text()
    rapl = RaplMeter(trees / "intel-x86-rapl" / "sys")
    orin = Ina3221Rails(trees / "jetson-orin-nano-hwmon" / "sys")
    orin_sum = Ina3221Rails(trees / "jetson-orin-nano-hwmon" / "sys", "sum")
    nano = Ina3221Rails(trees / "jetson-nano-ina3221x" / "sys", "sum")
    true = shutil.which("true") or "/bin/true"
    return {
        "rapl_package_dram_read_us": per_call_us(rapl.read_j),
        "ina3221_orin_vdd_in_read_us": per_call_us(orin.read_w),
        "ina3221_orin_sum_3_rails_read_us": per_call_us(orin_sum.read_w),
        "ina3221x_nano_sum_2_rails_read_us": per_call_us(nano.read_w),
        "pi5_pmic_parse_us": per_call_us(lambda: parse_pmic_adc(pmic_text)),
        "fork_exec_true_us": per_call_us(lambda: subprocess.run([true], check=False), min_s=1.0),
    }


def sampler_cpu(trees: Path, seconds: float) -> dict[str, float]:
    orin = Ina3221Rails(trees / "jetson-orin-nano-hwmon" / "sys")
    out: dict[str, float] = {}

    def cpu_over(wait_s: float, hz: float | None) -> tuple[float, int]:
        meter = SampledMeter("ina3221", orin.read_w, hz) if hz else None
        c0, t0 = time.process_time(), time.perf_counter()
        time.sleep(wait_s)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        samples = 0
        if meter is not None:
            samples = meter.samples
            meter.close()
        return cpu / wall, samples

    baseline, _ = cpu_over(seconds, None)
    for hz in (10.0, 100.0):
        share, samples = cpu_over(seconds, hz)
        out[f"sampler_{int(hz)}hz_cpu_percent"] = max(0.0, share - baseline) * 100
        out[f"sampler_{int(hz)}hz_achieved_hz"] = samples / seconds
    out["idle_baseline_cpu_percent"] = baseline * 100
    return out


class _NoopRuntime:
    class _Spec:
        name = "x"

    inputs = [_Spec()]
    outputs: list = []

    def run(self, inputs):
        return inputs


def hot_path(trees: Path, tmp: Path) -> dict[str, float]:
    import numpy as np

    x = {"x": np.zeros((1, 3), dtype=np.float32)}
    out = {}
    rapl = RaplMeter(trees / "intel-x86-rapl" / "sys")
    orin = Ina3221Rails(trees / "jetson-orin-nano-hwmon" / "sys")
    for label, meter, sampler_hz in (("none", NullMeter(), None), ("modelled", ModelledMeter(4.0, 1.0), None),
                                     ("rapl_window_meter", rapl, None),
                                     ("ina3221_sampled_100hz", None, 100.0)):
        sampler = SampledMeter("ina3221", orin.read_w, sampler_hz) if sampler_hz else None
        meter = meter if meter is not None else sampler
        tel = Telemetry("bench", 60.0, Outbox(tmp / f"outbox-{label}", 1 << 20))
        tel.attach_meter(meter, datetime.now(timezone.utc))
        service = InferenceService(None, meter=meter, telemetry=tel)  # type: ignore[arg-type]
        service._models["m"] = Loaded("m", 1, None, _NoopRuntime())  # type: ignore[arg-type]
        out[f"hot_path_{label}_us"] = per_call_us(lambda s=service: s.run("m", x), min_s=1.0)
        if sampler is not None:
            sampler.close()
    return out


ZEUS_SNIPPET = r"""
import json, os, sys, time, resource, multiprocessing as mp
root, wrap_from = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
import zeus.device.cpu.rapl as zr
import_s = time.perf_counter() - t0
zr.RAPL_DIR = root + "/class/powercap/intel-rapl"  # the module's one path constant; its Jetson paths are fixed
zr.rapl_is_available.cache_clear() if hasattr(zr.rapl_is_available, "cache_clear") else None
cpus = zr.RAPLCPUs()
cpu = cpus.cpus[0]
first = cpu.get_total_energy_consumption()
time.sleep(1.5)
children = len(mp.active_children())
n, t = 0, time.perf_counter()
while time.perf_counter() - t < 0.3:
    cpu.get_total_energy_consumption(); n += 1
per_read_us = (time.perf_counter() - t) / n * 1e6
pkg = root + "/class/powercap/intel-rapl:0/energy_uj"
open(pkg, "w").write(str(wrap_from))
time.sleep(2.5)  # let its tracker process see the counter near the top
before = cpu.get_total_energy_consumption().cpu_mj
open(pkg, "w").write("2500000")  # wrapped, then 2.5 J more
time.sleep(2.5)
after = cpu.get_total_energy_consumption().cpu_mj
print(json.dumps({"import_s": import_s, "processes_started": children, "per_read_us": per_read_us,
                  "wrap_delta_j": (after - before) / 1000.0, "dram_read": first.dram_mj is not None,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def zeus(python: str, trees: Path) -> dict:
    venv = Path(python).resolve().parents[1]
    site = next(venv.glob("lib/python*/site-packages"))
    seen: dict[tuple[int, int], int] = {}  # (device, inode) -> size: a hard-linked file counts once, as du does
    for d, _, names in os.walk(site):
        for f in names:
            st = os.lstat(os.path.join(d, f))
            seen[(st.st_dev, st.st_ino)] = st.st_size
    size_mb = sum(seen.values()) / 1e6
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True).stdout
    packages = sorted(p["name"].lower() for p in json.loads(listed) if p["name"].lower() not in ("pip", "setuptools"))
    root = trees / "intel-x86-rapl" / "sys"
    range_uj = int((root / "class" / "powercap" / "intel-rapl:0" / "max_energy_range_uj").read_text())
    run = subprocess.run([python, "-c", ZEUS_SNIPPET, str(root), str(range_uj - 1_000_000)], capture_output=True,
                         text=True, timeout=120, check=False)
    result = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else {"error": run.stderr[-800:]}
    # What zeus would add to the agent's install: everything it pulls that `.[agent]` does not already have.
    agent_has = {"numpy", "httpx", "httpcore", "h11", "anyio", "idna", "certifi", "pydantic", "pydantic_core",
                 "annotated-types", "typing_extensions", "typing-inspection"}
    added = [p for p in packages if p not in agent_has]
    added_mb = 0.0
    for dist in added:
        shown = subprocess.run([python, "-m", "pip", "show", "-f", dist], capture_output=True, text=True,
                               check=False).stdout
        location = next((line.split(": ", 1)[1] for line in shown.splitlines() if line.startswith("Location: ")), "")
        files = shown.split("Files:", 1)[1].split() if "Files:" in shown else []
        added_mb += sum(os.lstat(Path(location) / f).st_size for f in files if (Path(location) / f).exists()) / 1e6
    return {"site_packages_mb": round(size_mb, 1), "packages": packages, "added_to_agent": added,
            "added_to_agent_mb": round(added_mb, 1), "pulls_torch": "torch" in packages,
            "pulls_numpy": "numpy" in packages, "pulls_pandas": "pandas" in packages, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="wall time of each sampler measurement")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--zeus-python", help="an interpreter whose venv has `pip install zeus`, to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = tmp / "trees"
        shutil.copytree(FIXTURES, trees, symlinks=True)
        result: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                        "cpus": os.cpu_count(), "python": platform.python_version()}
        result.update(readers(trees))
        result.update(sampler_cpu(trees, args.seconds))
        result.update(hot_path(trees, tmp))
        if args.zeus_python:
            shutil.rmtree(trees)
            shutil.copytree(FIXTURES, trees, symlinks=True)
            result["zeus"] = zeus(args.zeus_python, trees)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:40} {value:.2f}" if isinstance(value, float) else f"{key:40} {value}")


if __name__ == "__main__":
    main()
