"""check_vm: does a VM's libvirt state match what Corral expects? (Nagios plugin)

Reads the VM's state from Corral's database, asks libvirtd on the VM's primary
server for the domain of the same name, and compares the two by the rule the
portal's poll and monitor follow (:func:`portal.monitoring.vm_state_for`):

* OK: they agree (running and running; off or saved, and the domain shut off
  or not defined);
* CRITICAL: they disagree (Corral says running, the domain is shut off or
  crashed; the domain runs while Corral says off), libvirt runs the VM on
  another server than Corral records (a move that failed half-way; or on two
  servers at once), or the server cannot be reached;
* WARNING: a task owns the VM (creating, partially created, migrating,
  deleting), it is paused or crashed as Corral knows, Corral does not know
  its state, or its server is marked down (not asked);
* UNKNOWN: Corral knows no VM of that name, or bad arguments.

    check_vm -N VMNAME [-t SECONDS] [-v]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import nagiosplugin

from checks import PluginArgumentParser
from portal import servers
from portal.extensions import db
from portal.models import VM, Server, ServerStatus, VMState
from portal.monitoring import TASK_OWNED, vm_state_for
from portal.vmm import domains
from portal.vmm.errors import VmmError
from portal.vmm.session import Target

# Corral states that are fine as long as libvirt agrees; the others agreeing still warn.
STEADY = {VMState.RUNNING.value, VMState.OFF.value, VMState.SAVED.value}
_SHOWN = {"shutoff": "shut off", None: "not defined"}


@dataclass
class Observed:
    """What one probe saw, for the portal to store or show."""

    vm: str
    expected: str | None = None  # Corral's VM state
    server: str | None = None
    server_marked_down: bool = False
    domain: str | None = None  # libvirt's state; None: not defined on the server
    asked: bool = False  # libvirt answered (domain is meaningful)
    error: str | None = None
    elsewhere: list[str] = field(default_factory=list)  # other servers where the domain is active

    @property
    def domain_shown(self) -> str:
        return _SHOWN.get(self.domain, self.domain)


def agrees(expected: str, domain: str | None) -> bool:
    """Would the poll leave Corral's state as it is, given libvirt's?"""
    return vm_state_for(domain, expected).value == expected


def _active(domain: str | None) -> bool:
    return domain is not None and vm_state_for(domain) in (VMState.RUNNING, VMState.PAUSED)


def judge(seen: Observed) -> tuple[nagiosplugin.state.ServiceState, str]:
    """The state and the sentence for what a probe saw."""
    name, expected = seen.vm, seen.expected
    if seen.server is None:
        if expected in TASK_OWNED:
            return nagiosplugin.Warn, f"{name} is {VMState(expected).label} and has no server yet"
        return nagiosplugin.Unknown, f"{name} is {expected} but Corral has placed it on no server"
    if seen.server_marked_down:
        return nagiosplugin.Warn, f"{seen.server} (server of {name}) is marked down; not asked"
    if not seen.asked:
        return nagiosplugin.Critical, f"cannot ask {seen.server} about {name}: {seen.error}"
    where = f"libvirt on {seen.server} reports {seen.domain_shown}"
    if expected in TASK_OWNED:
        also = f", and it is active on {', '.join(seen.elsewhere)}" if seen.elsewhere else ""
        return nagiosplugin.Warn, f"{name} is {VMState(expected).label} (a task owns it); {where}{also}"
    if seen.elsewhere:
        others = ", ".join(seen.elsewhere)
        if _active(seen.domain):
            return nagiosplugin.Critical, f"{name} runs twice: on {seen.server} (Corral's record) and on {others}"
        return nagiosplugin.Critical, (f"{name} runs on {others}, not where Corral expects it ({seen.server}, "
                                       f"where libvirt reports {seen.domain_shown})")
    if expected == VMState.UNKNOWN.value:
        return nagiosplugin.Warn, f"Corral does not know the state of {name}; {where}"
    if not agrees(expected, seen.domain):
        return nagiosplugin.Critical, f"Corral expects {name} {expected}, but {where}"
    if expected in STEADY:
        return nagiosplugin.Ok, f"{name} {expected} on {seen.server} ({seen.domain_shown}), as Corral expects"
    return nagiosplugin.Warn, f"{name} is {expected} on {seen.server}, as Corral knows"


class VmState(nagiosplugin.Resource):
    """Needs an application context (``main`` opens one; the portal has its own)."""

    def __init__(self, vm_name: str):
        self.vm_name = vm_name
        self.observed = Observed(vm_name)

    @property
    def name(self) -> str:
        return "VM"

    def _lookup(self) -> Target | None:
        """Fill in Corral's side; the target to ask, or None when there is nothing to ask."""
        seen = self.observed
        vm = db.session.execute(db.select(VM).where(VM.name == self.vm_name)).scalar_one_or_none()
        if vm is None:
            raise nagiosplugin.CheckError(f"Corral knows no VM called {self.vm_name!r}")
        seen.expected = vm.state
        if vm.server is None:
            return None
        seen.server = vm.server.hostname
        seen.server_marked_down = vm.server.status == ServerStatus.MARKED_DOWN.value
        return None if seen.server_marked_down else servers.target_for(vm.server)

    def probe(self):
        seen = self.observed
        target = self._lookup()
        if target is not None:
            try:
                seen.domain = domains.listed_state(target, self.vm_name)  # listed as the poll lists them
                seen.asked = True
            except VmmError as exc:
                seen.error = str(exc)
        if seen.asked:
            seen.elsewhere = self._active_elsewhere()
        match = int(seen.asked and not seen.elsewhere and agrees(seen.expected, seen.domain))
        yield nagiosplugin.Metric("state_match", match, min=0, max=1, context="vm_state")


    def _active_elsewhere(self) -> list[str]:
        """The other servers that are up where libvirt has the domain active; one that does not
        answer is skipped (its own check says so)."""
        vm = db.session.execute(db.select(VM).where(VM.name == self.vm_name)).scalar_one()
        others = db.session.execute(db.select(Server).where(
            Server.id != vm.server_id, Server.status == ServerStatus.UP.value).order_by(Server.hostname)
        ).scalars().all()
        found = []
        for server in others:
            try:
                state = domains.listed_state(servers.target_for(server), self.vm_name)
            except VmmError:
                continue
            if state and _active(state):
                found.append(server.hostname)
        return found


class VmStateContext(nagiosplugin.Context):
    def __init__(self):
        super().__init__("vm_state")

    def evaluate(self, metric, resource):
        state, hint = judge(resource.observed)
        return self.result_cls(state, hint, metric)

    def performance(self, metric, resource):
        if not resource.observed.asked:
            return None  # nothing was compared
        return nagiosplugin.Performance(metric.name, metric.value, min=0, max=1)


class VmSummary(nagiosplugin.Summary):
    def ok(self, results):
        return str(results.first_significant)

    def problem(self, results):
        return str(results.first_significant)


def build_check(vm_name: str) -> tuple[nagiosplugin.Check, VmState]:
    resource = VmState(vm_name)
    return nagiosplugin.Check(resource, VmStateContext(), VmSummary()), resource


def run_check(vm_name: str) -> tuple[str, str, str]:
    """Run the check in-process, in the current app context: (state name, summary line, perfdata)."""
    check, _ = build_check(vm_name)
    check()
    return check.state.text, check.summary_str, " ".join(p for p in check.perfdata if p)


def parser() -> argparse.ArgumentParser:
    p = PluginArgumentParser(prog="check_vm", description=__doc__.splitlines()[0], status_name="VM")
    p.add_argument("-N", "--name", required=True, help="VM name as in Corral")
    p.add_argument("-t", "--timeout", type=int, default=30)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


@nagiosplugin.guarded(verbose=0)
def main(argv=None):
    args = parser().parse_args(argv)
    from portal import create_app

    check, _ = build_check(args.name)
    with create_app().app_context():
        check.main(args.verbose, args.timeout)


if __name__ == "__main__":
    main()
