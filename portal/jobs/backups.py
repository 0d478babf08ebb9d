"""Jobs for backups: back a VM up (live, or a copy while off), restore one, delete one."""

from __future__ import annotations

import dataclasses

from .. import backups, servers
from ..extensions import db
from ..models import VM, Backup, BackupState, ServerDisk
from ..vmm import backup as vmm_backup
from ..vmm import domains
from ..vmm.domains import DomainState
from . import Progress, task_job

LIVE_STATES = (DomainState.RUNNING, DomainState.PAUSED, DomainState.BLOCKED)


def _vm(vm_id: int) -> VM:
    vm = db.session.get(VM, vm_id)
    if vm is None:
        raise LookupError("the VM was deleted meanwhile")
    return vm


def _backup(backup_id: int) -> Backup:
    found = db.session.get(Backup, backup_id)
    if found is None:
        raise LookupError("the backup was deleted meanwhile")
    return found


@task_job
def back_up_vm(progress: Progress, vm_id: int, scheduled: bool = False) -> str:
    """Every disk of the VM into its backup store: live with libvirt's backup job, or copied while off.

    A scheduled backup then prunes the VM's scheduled backups beyond the
    schedule's ``keep`` (whole chains only).
    """
    vm = _vm(vm_id)
    backups.check_backup(vm)
    schedule = backups.schedule_for(vm) if scheduled else None
    store = backups.store_for(vm)
    remote = store.server_id != vm.server_id
    with servers.session_for(vm.server) as session:
        progress.step(f"Looking at {vm.name}'s disks on {vm.server.hostname}", 2)
        live = domains.state(session, vm.name) in LIVE_STATES
        disks = vmm_backup.source_disks(session, vm.name)
        parent = (backups.incremental_parent(vm, disks, vmm_backup.checkpoints(session, vm.name), store)
                  if live else None)
        if schedule is not None and backups.chain_too_long(parent, schedule.keep):
            progress.log(f"The incremental chain holds {schedule.keep} backups: this scheduled backup starts a "
                         f"new full one, so older chains can be pruned.")
            parent = None
        backup = backups.start(vm, store, task_id=progress.task_id, live=live, parent=parent, scheduled=scheduled)
        backup_id, folder = backup.id, backup.path
        write_to = backups.staging_dir(vm, backup) if remote else folder
        where = f"{store.server.hostname}:{store.mountpoint}"
        db.session.commit()
        positions = {d.target: vd.position for d in disks for vd in vm.vdisks if vd.path == d.path}
        try:
            if live:
                checkpoint = vmm_backup.checkpoint_name(backup_id) if all(d.qcow2_v3 for d in disks) else None
                what = f"incremental since backup {parent.id}" if parent else "full"
                progress.step(f"Backing up {vm.name} while it runs ({what})", 5)
                if checkpoint is None:
                    progress.log("A disk is not qcow2 v3, so it cannot hold a checkpoint: every backup is full.")
                outcome = vmm_backup.back_up_running(
                    session, vm.name, write_to, checkpoint=checkpoint,
                    incremental_from=parent.checkpoint if parent else None,
                    parents={f.target: f.path for f in parent.files} if parent else None,
                    progress=lambda d, t: progress.bytes(d, t, pct_from=5, pct_to=85),
                    check=progress.check_cancel)
            else:
                progress.step(f"{vm.name} is off: copying and comparing its disks", 5)
                outcome = vmm_backup.copy_stopped(
                    session, vm.name, write_to, check=progress.check_cancel,
                    progress=lambda d, t: progress.items(d, t, pct_from=5, pct_to=85, noun="disks"))
            if remote:
                progress.step(f"Copying the backup to its store on {where} (checked by sha256)", 86)
                with servers.session_for(store.server) as store_session:
                    shipped = vmm_backup.ship(session, store_session, outcome.files, folder,
                                              progress=lambda d, t: progress.bytes(d, t, pct_from=86, pct_to=95))
                outcome = dataclasses.replace(outcome, files=shipped)
            progress.step("Recording sizes and sha256 of the backup files", 90)
        except BaseException:
            db.session.rollback()
            db.session.delete(_backup(backup_id))  # nothing of it is left on the server
            db.session.commit()
            raise
    backup = _backup(backup_id)
    backups.finish(backup, outcome, positions)
    db.session.commit()
    said = backups.describe(backup)
    if schedule is not None:
        doomed = backups.prunable(vm, schedule.keep)
        if doomed:
            progress.step(f"Pruning {len(doomed)} scheduled backup(s) beyond the newest {schedule.keep}", 95)
            _remove(progress, doomed)
            said += f"; pruned {len(doomed)} older scheduled backup(s)"
    return said


@task_job
def restore_vm(progress: Progress, vm_id: int, backup_id: int) -> str:
    """Replace the VM's disks (VM off) from a backup, after checking every file of its chain."""
    vm, backup = _vm(vm_id), _backup(backup_id)
    backups.check_restore(vm, backup)
    chain = backups.chain(backup)
    by_position = {vd.position: vd for vd in vm.vdisks}
    with servers.session_for(backup.server) as session:
        files = [f for b in chain for f in b.files]
        for i, f in enumerate(files):
            progress.step(f"Checking {f.path} (sha256)", 5 + 40 * i // len(files))
            vmm_backup.verify(session, f.path, f.sha256)
        if backup.server_id == vm.server_id:
            progress.step(f"Writing {vm.name}'s disks from backup {backup.id}", 50)
            pairs = [(f.path, by_position[f.position].path, by_position[f.position].backing_path)
                     for f in backup.files]
            vmm_backup.restore(session, vm.name, pairs, check=progress.check_cancel,
                               progress=lambda d, t: progress.items(d, t, pct_from=50, pct_to=95, noun="disks"))
            return f"{vm.name} restored from {backups.describe(backup)}"
        with servers.session_for(vm.server) as vm_session:
            fetched: list[str] = []
            try:
                for f in backup.files:
                    progress.step(f"Fetching disk {f.target} of backup {backup.id} from {backup.server.hostname} "
                                  f"to {vm.server.hostname} (flattened, checked by sha256)", 45)
                    fetched.append(f"{by_position[f.position].path}.from-backup-{backup.id}")
                    vmm_backup.fetch_flat(session, vm_session, f.path, fetched[-1],
                                          progress=lambda d, t: progress.bytes(d, t, pct_from=45, pct_to=70))
                progress.step(f"Writing {vm.name}'s disks from backup {backup.id}", 70)
                pairs = [(path, by_position[f.position].path, by_position[f.position].backing_path)
                         for f, path in zip(backup.files, fetched)]
                vmm_backup.restore(vm_session, vm.name, pairs, check=progress.check_cancel,
                                   progress=lambda d, t: progress.items(d, t, pct_from=70, pct_to=95, noun="disks"))
            finally:
                vm_session.run(["rm", "-f", "--", *fetched], check=False)
    return f"{vm.name} restored from {backups.describe(backup)}"


@task_job
def delete_backup(progress: Progress, vm_id: int, backup_id: int) -> str:
    """Remove a backup and those built on it, files first, then the rows."""
    backup = _backup(backup_id)
    doomed = backups.dependents(backup)
    said = backups.describe(backup)
    _remove(progress, doomed)
    extra = f" and {len(doomed) - 1} built on it" if len(doomed) > 1 else ""
    return f"Deleted {said}{extra}"


def _remove(progress: Progress, doomed: list[Backup]) -> None:
    """Delete backups (each listed after those it builds on): marked deleting, files newest first, then rows."""
    ids = [b.id for b in doomed]
    for b in doomed:
        b.state = BackupState.DELETING.value
    db.session.commit()
    for server_id in dict.fromkeys(b.server_id for b in reversed(doomed)):  # one session per store server
        here = [b for b in reversed(doomed) if b.server_id == server_id]
        with servers.session_for(here[0].server) as session:
            for b in here:
                progress.step(f"Removing {b.path}", 50)
                vmm_backup.remove(session, b.path, under=b.disk.mountpoint)
    for backup_id in reversed(ids):
        found = db.session.get(Backup, backup_id)
        if found is not None:
            db.session.delete(found)
            db.session.flush()
    db.session.commit()


def remove_all(progress: Progress, vm: VM) -> None:
    """For the VM's delete job: forget its checkpoints (libvirt will not undefine a domain that has
    some) and remove its backup stores from every server disk that holds its backups."""
    stores = set(db.session.execute(
        db.select(Backup.disk_id).where(Backup.vm_id == vm.id).distinct()).scalars())
    if vm.disk_id is not None:
        stores.add(vm.disk_id)  # staging folders of backups for another store live there
    if vm.server is not None:
        with servers.session_for(vm.server) as session:
            vmm_backup.forget_checkpoints(session, vm.name, metadata_only=True)
    for disk_id in sorted(stores):
        disk = db.session.get(ServerDisk, disk_id)
        progress.step(f"Removing {vm.name}'s backups from {disk.server.hostname}:{disk.mountpoint}", 20)
        with servers.session_for(disk.server) as session:
            vmm_backup.remove(session, vmm_backup.store_dir(disk.mountpoint, vm.name), under=disk.mountpoint)
