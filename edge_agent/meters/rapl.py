"""Intel RAPL through the powercap sysfs interface: a cumulative energy counter per domain, read at window edges.

Theory of operation: the kernel's powercap driver exposes each RAPL domain as `/sys/class/powercap/intel-rapl:N`
(a socket's package, `name` "package-N", or the platform, "psys") with subdomains `intel-rapl:N:M` ("core",
"uncore", "dram"). Each has `energy_uj`, microjoules since some origin, which wraps to 0 past
`max_energy_range_uj` (a package's is about 262 kJ: 44 minutes at 100 W). `read_j()` reads every chosen domain,
adds each one's delta since the last read, a wrapped one's as (range - previous) + current, and returns the total:
reads must come oftener than the shortest wrap period, and telemetry reads every tick (1 s). Domains:
  "package"       every package-N (core and uncore are inside it: never added again)
  "package+dram"  the packages plus their dram subdomains where the CPU has them (servers), the default
  "psys"          the platform domain alone (laptops with it): it includes the packages
The `intel-rapl-mmio:N` entries of newer client CPUs repeat package-N through MMIO and are never read.
AMD Zen CPUs expose the same powercap names (package only, no dram), so this meter serves them too.

Permissions: since Linux 5.10 (CVE-2020-8694, "Platypus") `energy_uj` is readable by root only. The agent runs as
its own user, so opening raises `MeterUnavailable` whose message gives the fix (a udev rule, or tmpfiles.d), and
detection falls back to the next meter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.edge_agent.meters.base import (
    CumulativeMeter,
    EnergyMethod,
    MeterPermissionDenied,
    MeterScope,
    MeterUnavailable,
)
from edgefleet.edge_agent.meters.sysfs import ReadText, read_attr, read_int

DOMAIN_CHOICES = ("package", "package+dram", "psys")
PERMISSION_FIX = (
    "energy_uj is readable by root only since Linux 5.10; let the agent read it with a udev rule "
    "(/etc/udev/rules.d/90-edgefleet-rapl.rules: "
    'ACTION=="add", SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", RUN+="/bin/chmod 0444 /sys%p/energy_uj"'
    " then `udevadm trigger --subsystem-match=powercap`), or for this boot only "
    "`sudo chmod 0444 /sys/class/powercap/intel-rapl:*/energy_uj /sys/class/powercap/intel-rapl:*:*/energy_uj`"
)


@dataclass
class _Domain:
    path: Path
    name: str
    range_uj: int
    last_uj: int


def _domains(root: Path, read_text: ReadText) -> list[tuple[Path, str, Path | None]]:
    """(path, name, parent path or None) for every intel-rapl domain under `root`, sorted."""
    out: list[tuple[Path, str, Path | None]] = []
    for top in sorted(root.glob("intel-rapl:*")):
        if top.name.count(":") != 1:
            continue  # subdomains show at the class level too (intel-rapl:0:0); taken below via their parent
        out.append((top, read_attr_or_empty(top / "name", read_text), None))
        for sub in sorted(top.glob("intel-rapl:*:*")):
            out.append((sub, read_attr_or_empty(sub / "name", read_text), top))
    return out


def read_attr_or_empty(path: Path, read_text: ReadText) -> str:
    try:
        return read_text(path)
    except OSError:
        return ""


class RaplMeter(CumulativeMeter):
    name = "rapl"
    method: EnergyMethod = "counter"
    scope: MeterScope = "component"

    def __init__(self, sysfs_root: str | Path = "/sys", domain: str = "package+dram", *,
                 read_text: ReadText = read_attr) -> None:
        super().__init__()
        if domain not in DOMAIN_CHOICES:
            raise ValueError(f"RAPL domain {domain!r}: use one of {', '.join(DOMAIN_CHOICES)}")
        self._read_text = read_text
        base = Path(sysfs_root) / "class" / "powercap"
        found = _domains(base, read_text)
        if not found:
            raise MeterUnavailable(f"no RAPL domains under {base} (intel-rapl:N); on Intel or AMD load the driver "
                                   "(`modprobe intel_rapl_msr`), elsewhere choose another energy.meter")
        packages = [(p, n) for p, n, parent in found if parent is None and n.startswith("package-")]
        if domain == "psys":
            chosen = [(p, n) for p, n, parent in found if parent is None and n == "psys"]
        else:
            chosen = list(packages)
            if domain == "package+dram":
                package_paths = {p for p, _ in packages}
                chosen += [(p, f"{parent.name}/dram") for p, n, parent in found
                           if parent in package_paths and n == "dram"]
        if not chosen:
            names = ", ".join(sorted({n for _, n, _ in found})) or "none named"
            raise MeterUnavailable(f"RAPL under {base} has no {domain} domain (it has: {names}); set "
                                   "energy.rapl_domain to one it has")
        self.domains: list[_Domain] = []
        for path, name in chosen:
            energy = path / "energy_uj"
            try:
                now = read_int(energy, read_text)
                range_uj = read_int(path / "max_energy_range_uj", read_text)
            except PermissionError:
                raise MeterPermissionDenied(f"cannot read {energy}: permission denied. {PERMISSION_FIX}") from None
            except (OSError, ValueError) as exc:
                raise MeterUnavailable(f"cannot read RAPL domain {name} at {path}: {exc}") from None
            self.domains.append(_Domain(path, name, range_uj, now))
        self._total_uj = 0
        self.domain = domain
        covers = "the platform, as the SoC sees it" if domain == "psys" else "the CPU package (and DRAM), not the board"
        self.label = "RAPL " + " + ".join(d.name for d in self.domains) + f" ({covers})"

    @staticmethod
    def delta_uj(previous: int, current: int, range_uj: int) -> int:
        """Microjoules between two reads of one counter, across at most one wrap at `range_uj`."""
        if current >= previous:
            return current - previous
        return (range_uj - previous) + current

    def _read_j(self) -> float:
        for d in self.domains:
            now = read_int(d.path / "energy_uj", self._read_text)
            self._total_uj += self.delta_uj(d.last_uj, now, d.range_uj)
            d.last_uj = now
        return self._total_uj / 1e6
