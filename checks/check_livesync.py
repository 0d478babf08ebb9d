"""check_livesync: is a VM's LiveSync copy on its backup server in sync? (Nagios plugin)

Reads the state Corral's monitor keeps current (block-job events and a watcher that reads every
mirror each second) and judges it by the rule the portal's pages and summary use
(:func:`portal.livesync.view`):

* OK: in sync (or the VM is off, so nothing is to mirror);
* WARNING: syncing (percent done as perfdata);
* CRITICAL: broken, unprotected while the VM runs, or the VM runs on its backup server;
* UNKNOWN: Corral knows no VM of that name, it has no backup mode, or bad arguments.

    check_livesync -N VMNAME [-t SECONDS] [-v]
"""

from __future__ import annotations

import argparse

import nagiosplugin

from checks import PluginArgumentParser
from portal import livesync
from portal.extensions import db
from portal.models import VM

_STATE = {livesync.OK: nagiosplugin.Ok, livesync.WARNING: nagiosplugin.Warn, livesync.CRITICAL: nagiosplugin.Critical}


class LiveSyncResource(nagiosplugin.Resource):
    """Needs an application context (``main`` opens one; the portal has its own)."""

    def __init__(self, vm_name: str):
        self.vm_name = vm_name
        self.view: livesync.View | None = None

    @property
    def name(self) -> str:
        return "LIVESYNC"

    def probe(self):
        vm = db.session.execute(db.select(VM).where(VM.name == self.vm_name)).scalar_one_or_none()
        if vm is None:
            raise nagiosplugin.CheckError(f"Corral knows no VM called {self.vm_name!r}")
        self.view = livesync.view(vm)
        if self.view.state == "none":
            raise nagiosplugin.CheckError(f"{self.vm_name} has no backup mode (not protected by LiveSync)")
        yield nagiosplugin.Metric("sync", self.view.pct, uom="%", min=0, max=100, context="livesync")


class LiveSyncContext(nagiosplugin.Context):
    def __init__(self):
        super().__init__("livesync")

    def evaluate(self, metric, resource):
        v = resource.view
        return self.result_cls(_STATE[v.level], f"{resource.vm_name}: {v.text}", metric)

    def performance(self, metric, resource):
        return nagiosplugin.Performance(metric.name, metric.value, metric.uom, min=0, max=100)


class LiveSyncSummary(nagiosplugin.Summary):
    def ok(self, results):
        return str(results.first_significant)

    def problem(self, results):
        return str(results.first_significant)


def build_check(vm_name: str) -> nagiosplugin.Check:
    return nagiosplugin.Check(LiveSyncResource(vm_name), LiveSyncContext(), LiveSyncSummary())


def parser() -> argparse.ArgumentParser:
    p = PluginArgumentParser(prog="check_livesync", description=__doc__.splitlines()[0], status_name="LIVESYNC")
    p.add_argument("-N", "--name", required=True, help="VM name as in Corral")
    p.add_argument("-t", "--timeout", type=int, default=30)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


@nagiosplugin.guarded(verbose=0)
def main(argv=None):
    args = parser().parse_args(argv)
    from portal import create_app

    check = build_check(args.name)
    with create_app().app_context():
        check.main(args.verbose, args.timeout)


if __name__ == "__main__":
    main()
