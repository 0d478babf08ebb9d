"""The failover job: start a protected VM on its backup server from the in-sync copy.

Re-checks the two-of-three rule (portal/ha.py) with fresh facts, then: records the copy stale and the
swap FIRST (``VM.server``/``disk`` <-> ``backup_server``/``backup_disk``, ``home_server_id`` stays,
``epoch`` + 1, state broken "primary down; running on backup") and commits, stops the backup's NBD
export (so no process holds the copy), defines the domain from the copy (no backing file: the copies
are flattened; autostart stays off) and starts it. The old primary's definition is undefined by the
witness when that server returns (portal/ha.py), before any resync.
"""

from __future__ import annotations

import dataclasses
import time

from flask import current_app

from .. import ha, livesync, servers, vms
from ..extensions import db
from ..models import VM, VMState, utcnow
from ..vmm import domains
from ..vmm import livesync as ls_vmm
from ..vmm.domain import DiskSpec, render
from . import Progress, task_job
from .networks import ensure_for as ensure_networks
from .vms import domain_spec, write_seed


@task_job
def failover_vm(progress: Progress, vm_id: int, automatic: bool = False) -> str:
    t0 = time.monotonic()
    vm = db.session.get(VM, vm_id)
    if vm is None or not livesync.protected(vm):
        raise ha.FailoverRefused("the VM is not protected by LiveSync")
    progress.step("Checking that the primary is gone (two of three)", 5)
    takeover = float(current_app.config["HA_TAKEOVER_SECONDS"])
    facts = ha.gather(vm)
    reason = ha.assess(vm, facts, takeover)
    if reason is not None:
        raise ha.FailoverRefused(f"{vm.name} stays where it is: {reason}.")
    old, new = vm.server, vm.backup_server
    copies = livesync.copy_paths(vm)
    spec = domain_spec(vm)
    spec = dataclasses.replace(spec, domain_type=new.domain_type, disks=tuple(
        DiskSpec(path, bus=d.bus, format="qcow2") for (_dev, path), d in zip(copies, spec.disks)))
    progress.step(f"Recording the switch to {new.hostname}", 20)
    ls = vm.livesync
    vm.server_id, vm.backup_server_id = vm.backup_server_id, vm.server_id
    vm.disk_id, vm.backup_disk_id = vm.backup_disk_id, vm.disk_id
    for d, (_dev, path) in zip(vm.vdisks, copies):
        d.path = path
    ls.epoch += 1
    livesync.mark_broken(ls, f"primary {old.hostname} down; running on backup")
    if vm.iso_id is not None:  # the ISO's cached copy is on the old primary's disk
        progress.log(f"The ISO {vm.iso.name} stays with {old.hostname}; {vm.name} starts without it.")
        vm.iso_id = None
    vm.state, vm.state_changed_at = VMState.UNKNOWN.value, utcnow()
    db.session.commit()  # from here on nothing acts on the old primary's copy
    # the cloud-init seed lived beside the old primary's disks: it is rendered again beside the copy
    spec = dataclasses.replace(spec, cdrom=None, seed=vms.seed_path(vm) if spec.seed else None)
    progress.step(f"Stopping the LiveSync export on {new.hostname}", 40)
    with servers.session_for(new) as s:
        ls_vmm.export_stop(s, vm.name)
        progress.step(f"Starting {vm.name} on {new.hostname} from its copy", 60)
        ensure_networks(progress, s, vm, new)
        if spec.seed:
            write_seed(progress, s, vm)
        domains.define(s, render(spec))
        domains.power(s, vm.name, "start")
    vm.state, vm.state_changed_at = VMState.RUNNING.value, utcnow()
    db.session.commit()
    took = time.monotonic() - t0
    return (f"{vm.name} runs on {new.hostname} ({'automatic' if automatic else 'operator'} failover, "
            f"epoch {ls.epoch}, {took:.1f} s); {old.hostname}'s copy is stale until resynced")
