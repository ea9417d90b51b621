"""NVIDIA Jetson INA3221 power monitors: rail power sampled by one thread (meters/sampler.py), integrated to joules.

Theory of operation: a Jetson carries one or two TI INA3221 three-channel monitors on its power rails. Two kernel
layouts exist, both read here:
- hwmon (JetPack 5 and 6: Orin, Xavier): `/sys/class/hwmon/hwmonN/` with `name` "ina3221", per channel `inK_label`
  (the rail: VDD_IN, VDD_CPU_GPU_CV, VDD_SOC on an Orin Nano), `inK_input` in mV and `currK_input` in mA;
  `inK_enable` 0 marks a channel off. The driver's extra channels (shunt voltages in4..in6, "sum of shunt voltages"
  in7, curr4) carry no rail label and current pair and are ignored.
- ina3221x iio (L4T 32: Nano, TX1, TX2): `/sys/bus/i2c/drivers/ina3221x/*/iio:device*/` with `rail_name_K`,
  `in_powerK_input` in mW (or `in_voltageK_input` mV and `in_currentK_input` mA).
Rails: "auto" takes the board's input rail (VDD_IN, or POM_5V_IN on a Nano), which is the whole module's draw, and
the sum of every rail where the board has no input rail (AGX Orin); "sum" adds every rail (on a board with an input
rail that counts the sub-rails twice: say so when you choose it); a rail's name takes that rail alone. A channel
named in `rail_name_K` whose readings are missing (an unpopulated rail) is left out with a warning, never a crash.
Power is watts = mV x mA / 1e6. The chip's own averaging (`update_interval`, `samples`) smooths between samples.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from edgefleet.edge_agent.meters.base import MeterPermissionDenied, MeterUnavailable
from edgefleet.edge_agent.meters.sampler import SampledMeter
from edgefleet.edge_agent.meters.sysfs import ReadText, read_attr, read_int, read_optional

log = logging.getLogger(__name__)

# The rails that carry the whole module's input, by board: Orin and Xavier NX name it VDD_IN, Nano and TX1 POM_5V_IN.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
_NOT_CONNECTED = ("NC", "")


@dataclass(frozen=True)
class Rail:
    label: str
    power_mw: Path | None  # ina3221x: in_powerK_input
    volts_mv: Path | None
    amps_ma: Path | None


def _hwmon_rails(root: Path, read_text: ReadText) -> list[Rail]:
    rails = []
    for dev in sorted((root / "class" / "hwmon").glob("hwmon*")):
        if read_optional(dev / "name", read_text) != "ina3221":
            continue
        for label_file in sorted(dev.glob("in*_label")):
            k = re.fullmatch(r"in(\d+)_label", label_file.name)
            if k is None:
                continue
            n = k.group(1)
            label = read_text(label_file)
            volts, amps = dev / f"in{n}_input", dev / f"curr{n}_input"
            if label in _NOT_CONNECTED or not amps.exists():
                continue  # "sum of shunt voltages" (in7) and the like: no current of its own
            if read_optional(dev / f"in{n}_enable", read_text) == "0":
                log.info("ina3221 %s: rail %s is disabled (in%s_enable = 0); left out", dev.name, label, n)
                continue
            if not volts.exists():
                log.warning("ina3221 %s: rail %s has no in%s_input; left out", dev.name, label, n)
                continue
            rails.append(Rail(label, None, volts, amps))
    return rails


def _iio_rails(root: Path, read_text: ReadText) -> list[Rail]:
    rails = []
    for dev in sorted((root / "bus" / "i2c" / "drivers" / "ina3221x").glob("*/iio:device*")):
        for name_file in sorted(dev.glob("rail_name_*")):
            k = name_file.name.rsplit("_", 1)[1]
            label = read_text(name_file)
            if label in _NOT_CONNECTED:
                continue
            power = dev / f"in_power{k}_input"
            volts, amps = dev / f"in_voltage{k}_input", dev / f"in_current{k}_input"
            if power.exists():
                rails.append(Rail(label, power, None, None))
            elif volts.exists() and amps.exists():
                rails.append(Rail(label, None, volts, amps))
            else:
                log.warning("ina3221x %s: rail %s (channel %s) has no power, voltage or current reading; left out",
                            dev, label, k)
    return rails


class Ina3221Rails:
    """The chosen rails of every INA3221 on the board, and their power now (`read_w`)."""

    def __init__(self, sysfs_root: str | Path = "/sys", rail: str = "auto", *, read_text: ReadText = read_attr) -> None:
        root = Path(sysfs_root)
        self._read_text = read_text
        try:
            found = _hwmon_rails(root, read_text) or _iio_rails(root, read_text)
        except PermissionError as exc:
            raise MeterPermissionDenied(f"cannot read the INA3221 rails: {exc}; run the agent in a group that may read "
                                   "them (`video` on L4T) or choose another energy.meter") from None
        if not found:
            raise MeterUnavailable(f"no INA3221 under {root}/class/hwmon (name ina3221) or "
                                   f"{root}/bus/i2c/drivers/ina3221x: not a Jetson, or its power monitor driver "
                                   "is not loaded; choose another energy.meter")
        labels = [r.label for r in found]
        if rail == "auto":
            inputs = [r for r in found if r.label in INPUT_RAILS]
            chosen = inputs[:1] or found
        elif rail == "sum":
            chosen = found
        else:
            chosen = [r for r in found if r.label == rail]
            if not chosen:
                raise MeterUnavailable(f"INA3221 rail {rail!r} not found; this board has {', '.join(labels)}: set "
                                       "energy.ina3221_rail to one of them, \"auto\" or \"sum\"")
        self.rails = chosen
        self.all_labels = labels
        self.rail = rail
        try:
            self.read_w()  # one read now: a meter that cannot read must fail detection, not the sampler thread
        except PermissionError as exc:
            raise MeterPermissionDenied(f"cannot read the INA3221 rails: {exc}; run the agent in a group that may "
                                        "read them (`video` on L4T) or choose another energy.meter") from None
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"INA3221 rails {', '.join(r.label for r in chosen)} cannot be read: {exc}; "
                                   "set energy.ina3221_rail to another rail or choose another energy.meter") from None

    def read_w(self) -> float:
        total_mw = 0.0
        for r in self.rails:
            if r.power_mw is not None:
                total_mw += read_int(r.power_mw, self._read_text)
            else:
                assert r.volts_mv is not None and r.amps_ma is not None
                total_mw += read_int(r.volts_mv, self._read_text) * read_int(r.amps_ma, self._read_text) / 1000.0
        return total_mw / 1000.0

    def describe(self) -> str:
        names = " + ".join(r.label for r in self.rails)
        board = "whole module input" if len(self.rails) == 1 and self.rails[0].label in INPUT_RAILS else "rails"
        return f"INA3221 {names} ({board})"


def open_ina3221(sysfs_root: str | Path = "/sys", rail: str = "auto", hz: float = 10.0, *,
                 read_text: ReadText = read_attr, start: bool = True) -> SampledMeter:
    rails = Ina3221Rails(sysfs_root, rail, read_text=read_text)
    # The whole board: its input rail alone, or every rail of a board without one. Sub-rails alone, or "sum" over
    # an input rail and its sub-rails, are not; the device class's idle watts do not apply to them.
    has_input = any(label in INPUT_RAILS for label in rails.all_labels)
    whole = ([r.label for r in rails.rails] in ([label] for label in INPUT_RAILS)
             or (not has_input and len(rails.rails) == len(rails.all_labels)))
    return SampledMeter("ina3221", rails.read_w, hz, scope="board" if whole else "component",
                        label=rails.describe(), start=start)
