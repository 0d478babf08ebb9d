"""check_vmm_host: is a VM server healthy? (Nagios plugin)

SSH reachable, libvirtd answering, free memory %, free space % on each VM
disk, load per CPU. The portal's poll runs the same :class:`VmmHost` resource
and :func:`build_check`, so the health view shows exactly what Nagios sees.

    check_vmm_host -H HOSTNAME [-w MEM%] [-c MEM%] [--disk-warning %] [--disk-critical %]
                   [--load-warning N] [--load-critical N] [-t SECONDS] [-v]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import libvirt
import nagiosplugin

from checks import PluginArgumentParser
from portal.vmm import facts as vmm_facts
from portal.vmm.errors import LibvirtUnavailable, VmmError
from portal.vmm.session import HostSession, Target, open_session

_STATES = {1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended"}


@dataclass
class Thresholds:
    mem_warning: float = 10.0  # % free
    mem_critical: float = 5.0
    disk_warning: float = 10.0
    disk_critical: float = 5.0
    load_warning: float = 4.0  # 1-minute load per CPU
    load_critical: float = 8.0


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


def list_domains(session: HostSession) -> list[dict]:
    out = []
    for dom in session.libvirt().listAllDomains():
        state, _reason = dom.state()
        out.append({"name": dom.name(), "uuid": dom.UUIDString(), "state": _STATES.get(state, "unknown")})
    return out


class VmmHost(nagiosplugin.Resource):
    def __init__(self, target: Target, mountpoints: list[str]):
        self.target = target
        self.mountpoints = mountpoints
        self.observed = Observed()

    @property
    def name(self) -> str:
        return "VMM_HOST"

    def probe(self):
        seen = self.observed
        with open_session(self.target) as session:
            if self.target.transport != "test":
                try:
                    session.run(["true"], timeout=15)
                    seen.ssh_ok = True
                except VmmError as exc:
                    seen.error = str(exc)
                    yield nagiosplugin.Metric("ssh", 0, context="up")
                    return
                yield nagiosplugin.Metric("ssh", 1, context="up")
            else:
                seen.ssh_ok = True
            try:
                seen.facts = vmm_facts.probe_facts(session)
                seen.domains = list_domains(session)
                seen.libvirt_ok = True
            except (LibvirtUnavailable, libvirt.libvirtError) as exc:
                seen.error = str(exc)
                yield nagiosplugin.Metric("libvirtd", 0, context="up")
                return
            yield nagiosplugin.Metric("libvirtd", 1, context="up")
            f = seen.facts
            yield nagiosplugin.Metric("mem_free", round(100 * f.free_memory_mb / max(1, f.memory_mb), 1), "%",
                                      min=0, max=100, context="mem_free")
            for mp in self.mountpoints:
                try:
                    d = vmm_facts.probe_disk(session, mp)
                except VmmError as exc:
                    seen.disk_errors[mp] = str(exc)
                    yield nagiosplugin.Metric(f"disk {mp}", 0, context="up")
                    continue
                seen.disks[mp] = d
                yield nagiosplugin.Metric(f"disk_free {mp}", round(100 * d.free_gb / max(1, d.size_gb), 1), "%",
                                          min=0, max=100, context="disk_free")
            seen.load = vmm_facts.probe_load(session)
            yield nagiosplugin.Metric("load1", round(seen.load.load1 / max(1, seen.load.cpus_online), 2),
                                      min=0, context="load")


class UpContext(nagiosplugin.Context):
    """1 is fine, 0 is CRITICAL (SSH, libvirtd, a VM disk)."""

    def __init__(self, resource: VmmHost):
        super().__init__("up")
        self.resource = resource

    def evaluate(self, metric, resource):
        if metric.value:
            return self.result_cls(nagiosplugin.Ok, None, metric)
        seen = self.resource.observed
        if metric.name.startswith("disk "):
            hint = seen.disk_errors.get(metric.name[5:], "missing")
        else:
            hint = seen.error or "not answering"
        return self.result_cls(nagiosplugin.Critical, f"{metric.name} down: {hint}", metric)

    def performance(self, metric, resource):
        return None


class HostSummary(nagiosplugin.Summary):
    def __init__(self, resource: VmmHost):
        self.resource = resource

    def ok(self, results):
        seen = self.resource.observed
        f = seen.facts
        parts = []
        if f is not None:
            parts.append(f"{f.free_memory_mb} of {f.memory_mb} MB free")
        for mp, d in seen.disks.items():
            parts.append(f"{mp} {d.free_gb} of {d.size_gb} GB free")
        if seen.load is not None:
            parts.append(f"load {seen.load.load1:.2f}")
        parts.append(f"{len(seen.domains)} domain(s)")
        return "; ".join(parts)

    def problem(self, results):
        worst = results.most_significant
        return "; ".join(str(r) for r in worst)


def build_check(target: Target, mountpoints: list[str], t: Thresholds | None = None
                ) -> tuple[nagiosplugin.Check, VmmHost]:
    t = t or Thresholds()
    resource = VmmHost(target, mountpoints)
    check = nagiosplugin.Check(
        resource,
        UpContext(resource),
        nagiosplugin.ScalarContext("mem_free", f"{t.mem_warning}:", f"{t.mem_critical}:",
                                   fmt_metric="{value}% memory free"),
        nagiosplugin.ScalarContext("disk_free", f"{t.disk_warning}:", f"{t.disk_critical}:",
                                   fmt_metric="{name} {value}%"),
        nagiosplugin.ScalarContext("load", f"{t.load_warning}", f"{t.load_critical}",
                                   fmt_metric="load per CPU {value}"),
        HostSummary(resource),
    )
    return check, resource


def run_check(target: Target, mountpoints: list[str], t: Thresholds | None = None):
    """Run the check in-process: (state name, summary line, perfdata, observed)."""
    check, resource = build_check(target, mountpoints, t)
    try:
        check()
    except VmmError as exc:  # what main() would report as UNKNOWN
        return "unknown", str(exc), "", resource.observed
    return check.state.text, check.summary_str, " ".join(check.perfdata), resource.observed


def _target_from_corral(hostname: str) -> tuple[Target, list[str]]:
    from portal import create_app, servers
    from portal.extensions import db
    from portal.models import Server

    app = create_app()
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == hostname)).scalar_one_or_none()
        if server is None:
            raise nagiosplugin.CheckError(f"Corral knows no server called {hostname!r}")
        return servers.target_for(server), [d.mountpoint for d in server.disks]


def parser() -> argparse.ArgumentParser:
    p = PluginArgumentParser(prog="check_vmm_host", description=__doc__.splitlines()[0], status_name="VMM_HOST")
    p.add_argument("-H", "--hostname", required=True, help="server name as registered in Corral")
    p.add_argument("-w", "--warning", type=float, default=10.0, help="free memory %% below which to warn")
    p.add_argument("-c", "--critical", type=float, default=5.0, help="free memory %% below which it is critical")
    p.add_argument("--disk-warning", type=float, default=10.0)
    p.add_argument("--disk-critical", type=float, default=5.0)
    p.add_argument("--load-warning", type=float, default=4.0)
    p.add_argument("--load-critical", type=float, default=8.0)
    p.add_argument("-t", "--timeout", type=int, default=30)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


@nagiosplugin.guarded
def main(argv=None):
    args = parser().parse_args(argv)
    target, mountpoints = _target_from_corral(args.hostname)
    t = Thresholds(args.warning, args.critical, args.disk_warning, args.disk_critical,
                   args.load_warning, args.load_critical)
    check, _ = build_check(target, mountpoints, t)
    check.main(args.verbose, args.timeout)


if __name__ == "__main__":
    main()
