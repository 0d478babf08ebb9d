"""check_vmm_host: is a VM server healthy? (Nagios plugin)

SSH reachable, libvirtd answering, free memory %, free space % on each VM
disk, load per CPU. The probe and the rules that judge it are
:mod:`portal.vmm.health`'s; the portal's poll calls the same code, so the
health view shows exactly what Nagios sees. This module only wraps them in
nagiosplugin's Resource, Context and Summary.

    check_vmm_host -H HOSTNAME [-w MEM%] [-c MEM%] [--disk-warning %] [--disk-critical %]
                   [--load-warning N] [--load-critical N] [-t SECONDS] [-v]
"""

from __future__ import annotations

import argparse

import nagiosplugin

from checks import PluginArgumentParser
from portal.vmm import health
from portal.vmm.session import Target, open_session

_STATES = {health.Status.OK: nagiosplugin.Ok, health.Status.WARNING: nagiosplugin.Warn,
           health.Status.CRITICAL: nagiosplugin.Critical, health.Status.UNKNOWN: nagiosplugin.Unknown}


class VmmHost(nagiosplugin.Resource):
    """Probes the server (or takes what a probe already saw) and yields health's judged measures."""

    def __init__(self, target: Target | None, mountpoints: list[str], t: health.Thresholds = health.DEFAULTS,
                 observed: health.Observed | None = None):
        self.target = target
        self.mountpoints = mountpoints
        self.thresholds = t
        self.observed = observed
        self.verdict: health.Verdict | None = None

    @property
    def name(self) -> str:
        return "VMM_HOST"

    def probe(self):
        if self.observed is None:
            with open_session(self.target) as session:
                self.observed = health.probe(session, self.mountpoints)
        self.verdict = health.assess(self.observed, self.thresholds)
        return [nagiosplugin.Metric(m.name, m.value, m.uom, min=m.min, max=m.max, context="health")
                for m in self.verdict.measures]


class HealthContext(nagiosplugin.Context):
    """Reports health's judgement of each measure as it is (no rules of its own)."""

    def __init__(self):
        super().__init__("health")

    def _measure(self, metric, resource) -> health.Measure:
        return next(m for m in resource.verdict.measures if m.name == metric.name)

    def evaluate(self, metric, resource):
        m = self._measure(metric, resource)
        return self.result_cls(_STATES[m.status], m.hint, metric)

    def performance(self, metric, resource):
        m = self._measure(metric, resource)
        if not m.perf:
            return None
        return nagiosplugin.Performance(m.name, m.value, m.uom, m.warning, m.critical,
                                        "" if m.min is None else m.min, "" if m.max is None else m.max)


class HostSummary(nagiosplugin.Summary):
    def __init__(self, resource: VmmHost):
        self.resource = resource

    def ok(self, results):
        return self.resource.verdict.summary

    def problem(self, results):
        return self.resource.verdict.summary


def build_check(target: Target | None, mountpoints: list[str], t: health.Thresholds = health.DEFAULTS, *,
                observed: health.Observed | None = None) -> tuple[nagiosplugin.Check, VmmHost]:
    resource = VmmHost(target, mountpoints, t, observed)
    return nagiosplugin.Check(resource, HealthContext(), HostSummary(resource)), resource


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
    d = health.DEFAULTS
    p.add_argument("-w", "--warning", type=float, default=d.mem_warning, help="free memory %% below which to warn")
    p.add_argument("-c", "--critical", type=float, default=d.mem_critical,
                   help="free memory %% below which it is critical")
    p.add_argument("--disk-warning", type=float, default=d.disk_warning, help="free %% on a VM disk")
    p.add_argument("--disk-critical", type=float, default=d.disk_critical)
    p.add_argument("--load-warning", type=float, default=d.load_warning, help="1-minute load per CPU")
    p.add_argument("--load-critical", type=float, default=d.load_critical)
    p.add_argument("-t", "--timeout", type=int, default=30)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


@nagiosplugin.guarded
def main(argv=None):
    args = parser().parse_args(argv)
    target, mountpoints = _target_from_corral(args.hostname)
    t = health.Thresholds(args.warning, args.critical, args.disk_warning, args.disk_critical,
                          args.load_warning, args.load_critical)
    check, _ = build_check(target, mountpoints, t)
    check.main(args.verbose, args.timeout)


if __name__ == "__main__":
    main()
