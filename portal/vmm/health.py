"""Is a VM server healthy? The probe and the rules that judge it, in one place.

``check_vmm_host`` (the Nagios plugin) and the portal's periodic poll both
call :func:`probe` and :func:`assess`, so the health view shows exactly what
Nagios sees: the same measurements, the same thresholds, the same words.
Plain data in, plain data out; the plugin wraps the :class:`Measure` list in
nagiosplugin's Metric/Context/Summary, the portal stores the :class:`Verdict`.

What is judged: SSH answers, libvirtd answers, free memory %, free space %
on each VM disk, 1-minute load per CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum

import libvirt

from . import domains as vmm_domains
from . import facts as vmm_facts
from .errors import VmmError
from .session import HostSession, Target, open_session


class Status(IntEnum):
    """Nagios states; the number is the plugin's exit code, so ``max`` is the worst."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3

    @property
    def text(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Thresholds:
    """The one set of defaults (plugin arguments and portal settings start from these)."""

    mem_warning: float = 10.0  # % memory free below which to warn
    mem_critical: float = 5.0
    disk_warning: float = 10.0  # % free on a VM disk
    disk_critical: float = 5.0
    load_warning: float = 4.0  # 1-minute load per CPU above which to warn
    load_critical: float = 8.0


DEFAULTS = Thresholds()


@dataclass
class Observed:
    """What one probe saw, for the portal's poll to store."""

    ssh_ok: bool = False
    libvirt_ok: bool = False
    error: str | None = None
    facts: vmm_facts.HostFacts | None = None
    disks: dict[str, vmm_facts.DiskFacts] = field(default_factory=dict)
    disk_errors: dict[str, str] = field(default_factory=dict)
    load: vmm_facts.LoadFacts | None = None
    domains: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Measure:
    """One judged measurement: a Nagios metric with its state, sentence and perfdata ranges."""

    name: str
    value: float
    status: Status
    hint: str | None  # what the plugin prints for a problem; None when fine
    uom: str = ""
    min: float | None = None
    max: float | None = None
    warning: str = ""  # Nagios range strings ("10:" = at least 10)
    critical: str = ""
    perf: bool = True  # reported in the performance data

    @property
    def perfdata(self) -> str:
        """``label=value[uom];warn;crit;min;max`` as the plugin API writes it (empty fields trimmed)."""
        label = self.name if re.match(r"^\w+$", self.name) else f"'{self.name}'"
        out = [f"{label}={self.value}{self.uom}", self.warning, self.critical,
               _num(self.min), _num(self.max)]
        while out and out[-1] == "":
            out.pop()
        return ";".join(out)


@dataclass(frozen=True)
class Verdict:
    status: Status
    summary: str
    measures: list[Measure]

    @property
    def perfdata(self) -> str:
        """All performance data, sorted as the plugin prints it."""
        return " ".join(sorted(m.perfdata for m in self.measures if m.perf))


def _num(value: float | None) -> str:
    return "" if value is None else str(value)


def _g(value: float) -> str:
    return f"{value:g}"


# --- probing ---------------------------------------------------------------------

def probe(session: HostSession, mountpoints: list[str]) -> Observed:
    """Look at the server once. Stops at the first layer that does not answer
    (no SSH: nothing else is asked; no libvirtd: no facts, disks or load)."""
    seen = Observed()
    try:
        session.run(["true"], timeout=15)
        seen.ssh_ok = True
    except VmmError as exc:
        seen.error = str(exc)
        return seen
    try:
        seen.facts = vmm_facts.probe_facts(session)
        seen.domains = vmm_domains.list_domains(session.libvirt())
        seen.libvirt_ok = True
    except VmmError as exc:
        seen.error = str(exc)
        return seen
    except libvirt.libvirtError as exc:  # the connection dropped while listing domains
        seen.error = f"{session.target.hostname}: libvirt did not answer: {exc.get_error_message()}"
        return seen
    for mp in mountpoints:
        try:
            seen.disks[mp] = vmm_facts.probe_disk(session, mp)
        except VmmError as exc:
            seen.disk_errors[mp] = str(exc)
    seen.load = vmm_facts.probe_load(session)
    return seen


# --- judging ---------------------------------------------------------------------

def _up(name: str, ok: bool, why: str | None) -> Measure:
    """1 is fine, 0 is CRITICAL (SSH, libvirtd, a VM disk); not performance data."""
    if ok:
        return Measure(name, 1, Status.OK, None, perf=False)
    return Measure(name, 0, Status.CRITICAL, f"{name} down: {why or 'not answering'}", perf=False)


def _at_least(name: str, value: float, warn: float, crit: float, shown: str, **kw) -> Measure:
    """A value that is bad when low (free memory, free disk)."""
    status = Status.CRITICAL if value < crit else Status.WARNING if value < warn else Status.OK
    bound = crit if status is Status.CRITICAL else warn
    hint = None if status is Status.OK else f"{shown} (outside range {_g(bound)}:)"
    return Measure(name, value, status, hint, warning=f"{_g(warn)}:", critical=f"{_g(crit)}:", **kw)


def _at_most(name: str, value: float, warn: float, crit: float, shown: str, **kw) -> Measure:
    """A value that is bad when high (load), or below zero."""
    status = Status.CRITICAL if not 0 <= value <= crit else Status.WARNING if value > warn else Status.OK
    bound = crit if status is Status.CRITICAL else warn
    hint = None if status is Status.OK else f"{shown} (outside range 0:{_g(bound)})"
    return Measure(name, value, status, hint, warning=_g(warn), critical=_g(crit), **kw)


def measures(seen: Observed, t: Thresholds = DEFAULTS) -> list[Measure]:
    """Every measurement of a probe, judged against *t*, in the plugin's order."""
    out = [_up("ssh", seen.ssh_ok, seen.error)]
    if not seen.ssh_ok:
        return out
    out.append(_up("libvirtd", seen.libvirt_ok, seen.error))
    if not seen.libvirt_ok or seen.facts is None:
        return out
    f = seen.facts
    mem = round(100 * f.free_memory_mb / max(1, f.memory_mb), 1)
    out.append(_at_least("mem_free", mem, t.mem_warning, t.mem_critical, f"{mem}% memory free",
                         uom="%", min=0, max=100))
    for mp, why in seen.disk_errors.items():
        out.append(_up(f"disk {mp}", False, why))
    for mp, d in seen.disks.items():
        free = round(100 * d.free_gb / max(1, d.size_gb), 1)
        name = f"disk_free {mp}"
        out.append(_at_least(name, free, t.disk_warning, t.disk_critical, f"{name} {free}%",
                             uom="%", min=0, max=100))
    if seen.load is not None:
        per_cpu = round(seen.load.load1 / max(1, seen.load.cpus_online), 2)
        out.append(_at_most("load1", per_cpu, t.load_warning, t.load_critical, f"load per CPU {per_cpu}", min=0))
    return out


def ok_summary(seen: Observed) -> str:
    """The line for a healthy server: what it has free and runs."""
    parts = []
    if seen.facts is not None:
        parts.append(f"{seen.facts.free_memory_mb} of {seen.facts.memory_mb} MB free")
    for mp, d in seen.disks.items():
        parts.append(f"{mp} {d.free_gb} of {d.size_gb} GB free")
    if seen.load is not None:
        parts.append(f"load {seen.load.load1:.2f}")
    parts.append(f"{len(seen.domains)} domain(s)")
    return "; ".join(parts)


def problem_summary(found: list[Measure]) -> str:
    """The line for a server with problems: the sentences of the worst ones."""
    worst = max(m.status for m in found)
    return "; ".join(m.hint or "" for m in found if m.status == worst)


def assess(seen: Observed, t: Thresholds = DEFAULTS) -> Verdict:
    found = measures(seen, t)
    status = max(m.status for m in found)
    summary = ok_summary(seen) if status is Status.OK else problem_summary(found)
    return Verdict(status, summary, found)


def check(target: Target, mountpoints: list[str], t: Thresholds = DEFAULTS) -> tuple[Verdict, Observed]:
    """Probe and judge one server; a failure outside the probe's layers is UNKNOWN."""
    try:
        with open_session(target) as session:
            seen = probe(session, mountpoints)
    except VmmError as exc:  # what the plugin would report as UNKNOWN
        return Verdict(Status.UNKNOWN, str(exc), []), Observed(error=str(exc))
    return assess(seen, t), seen
