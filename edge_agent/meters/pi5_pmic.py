"""Raspberry Pi 5 PMIC rails through `vcgencmd pmic_read_adc`: the rails' V x A summed, sampled by one thread.

Theory of operation: the Pi 5's power management IC (Renesas DA9091) measures its own output rails, and the
firmware prints them for `vcgencmd pmic_read_adc`, one line each, current lines then voltage lines:

       VDD_CORE_A current(7)=0.56259000A
       VDD_CORE_V volt(15)=0.76798460V
          EXT5V_V volt(24)=5.14158000V

`parse_pmic_adc` pairs each rail's `_A` and `_V` lines; the power is the paired rails' volts times amps, summed. The
volt-only lines (EXT5V, the 5 V input; BATT, the RTC cell) have no current and add nothing.

The 5 V gap: these are the PMIC's OUTPUT rails. What the board draws on its 5 V input beyond them is not seen: the
USB ports' and the fan's 5 V, the PMIC's own conversion losses, and anything on the GPIO header's 5 V pins. The
figure is therefore below the wall: labelled "partial", and the device class's idle watts (a wall figure) are not
subtracted from it. One public monitoring tool fits the wall as 1.1451 x rails + 0.5879 W for its board; we report
the rails as they are rather than a fit from one board.

Rate: `vcgencmd` is a fork and exec per sample, never per inference. A public Pi 5 logger reports about 0.1 s per
call, so the thread reaches about 10 Hz at most there; it says what it reached in `energy_hz`. `run` (a callable
returning the tool's text) is a parameter so tests feed recorded output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet.edge_agent.meters.base import MeterReadError, MeterUnavailable
from edgefleet.edge_agent.meters.sampler import SampledMeter

# "     VDD_CORE_A current(7)=0.56259000A" / "      EXT5V_V volt(24)=5.14158000V"
_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")
VCGENCMD_TIMEOUT_S = 2.0  # a hung firmware mailbox must not hang the sampler for ever
LABEL = "Pi 5 PMIC output rails (misses the 5 V side: USB ports, fan, conversion losses)"


@dataclass(frozen=True)
class PmicRails:
    watts: dict[str, float]  # rail -> V x A, for every rail with both lines
    volts_only: dict[str, float]  # EXT5V, BATT: a voltage and no current

    @property
    def total_w(self) -> float:
        return sum(self.watts.values())


def parse_pmic_adc(text: str) -> PmicRails:
    """Pair the `_A` and `_V` lines of `vcgencmd pmic_read_adc` output per rail. ValueError when no rail pairs
    (a Pi without the PMIC answers `error=1 error_msg="Command not registered"`)."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        (amps if m["unit"] == "A" else volts)[m["rail"]] = float(m["value"])
    watts = {rail: volts[rail] * a for rail, a in amps.items() if rail in volts}
    if not watts:
        first = text.strip().splitlines()[0][:80] if text.strip() else "nothing"
        raise ValueError(f"no PMIC rails in the vcgencmd output (it printed {first!r})")
    return PmicRails(watts, {rail: v for rail, v in volts.items() if rail not in amps})


def run_vcgencmd(binary: str = "vcgencmd") -> str:
    """The real tool, once. MeterReadError when it fails or hangs."""
    try:
        done = subprocess.run([binary, "pmic_read_adc"], capture_output=True, text=True, timeout=VCGENCMD_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MeterReadError(f"vcgencmd pmic_read_adc failed: {exc}") from None
    if done.returncode != 0:
        raise MeterReadError(f"vcgencmd pmic_read_adc exited {done.returncode}: {(done.stderr or done.stdout)[:200]}")
    return done.stdout


def open_pi5_pmic(hz: float = 10.0, *, run: Callable[[], str] | None = None, start: bool = True) -> SampledMeter:
    """A sampled meter over the PMIC's rails; MeterUnavailable when vcgencmd is absent or has no PMIC to read."""
    if run is None:
        if shutil.which("vcgencmd") is None:
            raise MeterUnavailable("vcgencmd is not on PATH: not a Raspberry Pi OS image (install the "
                                   "`raspi-utils` package on a Pi 5), or choose another energy.meter")
        run = run_vcgencmd
    try:
        first = parse_pmic_adc(run())
    except (ValueError, MeterReadError) as exc:
        raise MeterUnavailable(f"the Pi 5 PMIC cannot be read: {exc}; it needs a Pi 5 with firmware from late "
                               "2023 on (`sudo rpi-eeprom-update`), and the agent's user in the `video` group "
                               "for /dev/vcio") from None
    del first

    def read_w() -> float:
        return parse_pmic_adc(run()).total_w

    return SampledMeter("pi5-pmic", read_w, hz, scope="partial", label=LABEL, start=start)
