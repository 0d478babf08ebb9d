"""Jobs for LiveSync: set up or change protection, (re)sync a VM's copy, stop the mirror around moves,
fail back to the home server.

The copy is pre-created on the backup server as an empty standalone qcow2 of each disk's virtual size
(a clone's copy is flattened: the backup needs no cached base) and the initial sync fills it through
the synchronous mirror. Every resync is a full copy (QEMU's mirror copies the whole guest-visible disk).
"""

from __future__ import annotations

import time

from .. import livesync, servers, tasks
from ..extensions import db
from ..models import VM, BackupMode, LiveSyncState, Server, ServerDisk, ServerStatus, VMState
from ..vmm import images
from ..vmm import livesync as ls_vmm
from ..vmm.errors import VmmError
from . import Progress, task_job

READY_POLL_S = 0.5
NO_PROGRESS_S = 60  # a sync whose copied bytes do not move for this long has failed


def _vm(vm_id: int) -> VM:
    vm = db.session.get(VM, vm_id)
    if vm is None:
        raise LookupError("the VM was deleted meanwhile")
    return vm


def submit_resync(vm: VM, *, requester_id: int | None = None, why: str = "") -> tasks.Submitted:
    """Record a resync task for *vm* (flushes; one at a time per VM). The caller commits, then enqueues."""
    return tasks.submit("livesync-resync", resync_vm, title=f"LiveSync {vm.name}" + (f" ({why})" if why else ""),
                        requester_id=requester_id, target=vm, key=f"livesync:{vm.id}", args=(vm.id,))


def enqueue_resync(vm: VM, *, why: str = "") -> None:
    """From a job or the monitor: record, commit, enqueue a resync."""
    sub = submit_resync(vm, why=why)
    db.session.commit()
    try:
        tasks.enqueue(sub)
    except tasks.QueueUnavailable:
        pass  # the task row says it failed; the monitor tries again
    db.session.commit()


def prepare_copies(progress: Progress, vm: VM) -> list[str]:
    """Empty copies of the VM's disks on its backup server (existing ones are kept), and the export
    of them started. Returns the files it created."""
    backup = vm.backup_server
    copies = livesync.copy_paths(vm)
    with servers.session_for(vm.server) as primary:
        sizes = [images.info(primary, d.path).virtual_size for d in vm.vdisks]
    progress.step(f"Creating the copies on {backup.hostname}", 10)
    with servers.session_for(backup) as s:
        made = ls_vmm.create_copies(s, [(path, size) for (_dev, path), size in zip(copies, sizes)])
        ls_vmm.export_start(s, vm.name, copies, backup.address, vm.livesync.export_port)
    return made


def _mirror_and_wait(progress: Progress, vm_id: int) -> str:
    """Start the mirror of every disk and follow it to its ready phase; the row says in sync then."""
    vm = _vm(vm_id)
    backup, ls = vm.backup_server, vm.livesync
    devs = livesync.devs(vm)
    with servers.session_for(vm.server) as primary:
        progress.step(f"Mirroring {', '.join(devs)} to {backup.hostname}", 20)
        if not ls_vmm.mirror_status(primary, vm.name):
            # a new mirror copies every disk again: the copy is not in sync until it is ready
            ls.state, ls.progress_pct, ls.bytes_done = LiveSyncState.SYNCING.value, 0, 0
            db.session.commit()
        ls_vmm.mirror_start(primary, vm.name, backup.address, ls.export_port, devs)
        last, moved_at = -1, time.monotonic()
        while True:
            jobs = ls_vmm.mirror_status(primary, vm.name)
            vm = _vm(vm_id)
            ls = vm.livesync
            if {j.dev for j in jobs} != set(devs):
                if ls.state == LiveSyncState.IN_SYNC.value and not ls_vmm.domain_active(primary, vm.name):
                    # the VM's QEMU died after its copy was recorded in sync (by the watcher, between two
                    # of these reads): the copy is as good as it was; failover (portal/ha.py) needs it so
                    raise VmmError(f"{vm.name} stopped running on {vm.server.hostname}; its copy stays in sync")
                livesync.mark_broken(ls, "the mirror failed while syncing (backup server or export gone)")
                db.session.commit()
                raise VmmError(f"the LiveSync mirror of {vm.name} failed while syncing")
            done, total = sum(j.cur for j in jobs), sum(j.end for j in jobs)
            if all(j.ready for j in jobs):
                livesync.mark_in_sync(ls, total)
                db.session.commit()
                progress.log(f"{vm.name} is in sync with {backup.hostname} ({total / (1 << 20):.0f} MiB).")
                return "in sync"
            livesync.mark_syncing(ls, done, total)
            db.session.commit()  # and the next round reads the row afresh (the watcher writes it too)
            progress.bytes(done, max(total, 1), pct_from=20, pct_to=99)
            if done != last:
                last, moved_at = done, time.monotonic()
            elif time.monotonic() - moved_at > NO_PROGRESS_S:
                livesync.mark_broken(ls, f"the sync made no progress for {NO_PROGRESS_S} s")
                db.session.commit()
                ls_vmm.mirror_yank(primary, vm.name)
                raise VmmError(f"the LiveSync of {vm.name} made no progress for {NO_PROGRESS_S} s")
            time.sleep(READY_POLL_S)


def sync(progress: Progress, vm_id: int) -> str:
    """Copies and export on the backup, then (when the VM runs) the mirror to its ready phase."""
    vm = _vm(vm_id)
    if not livesync.protected(vm):
        return "not protected"
    if vm.backup_server.status == ServerStatus.MARKED_DOWN.value:  # "down" is tried: the poll may lag
        livesync.mark_broken(vm.livesync, f"backup server {vm.backup_server.hostname} is marked down")
        db.session.commit()
        return "backup server marked down"
    if vm.state == VMState.RUNNING.value:
        with servers.session_for(vm.server) as primary:
            if not ls_vmm.domain_active(primary, vm.name):
                # never touch the backup's export for a VM not running where Corral records it
                # (its primary may be dying: failover needs that export stopped, not restarted)
                raise VmmError(f"{vm.name} does not run on {vm.server.hostname}; not syncing")
    try:
        prepare_copies(progress, vm)
    except VmmError as exc:
        livesync.mark_broken(_vm(vm_id).livesync, f"preparing the copy on {vm.backup_server.hostname} failed: {exc}")
        db.session.commit()
        raise
    vm = _vm(vm_id)
    if vm.state != VMState.RUNNING.value:
        livesync.mark_unprotected(vm.livesync, "the VM is off; the mirror starts when it runs")
        db.session.commit()
        return "copies ready; the mirror starts when the VM runs"
    return _mirror_and_wait(progress, vm_id)


@task_job
def resync_vm(progress: Progress, vm_id: int) -> str:
    return sync(progress, vm_id)


def _drop_copies(progress: Progress, vm: VM, server: Server, disk: ServerDisk) -> None:
    progress.step(f"Removing the LiveSync copy from {server.hostname}", 10)
    with servers.session_for(server) as s:
        ls_vmm.export_stop(s, vm.name)
        ls_vmm.remove_copies(s, [p for _d, p in livesync.copy_paths(vm, disk)])


@task_job
def protect_vm(progress: Progress, vm_id: int, old_server_id: int | None, old_disk_id: int | None) -> str:
    """Apply the VM's recorded protection: stop and remove the old copy (another backup server, or
    protection off), then set up the new one and sync it."""
    vm = _vm(vm_id)
    moved = old_server_id is not None and (old_server_id != vm.backup_server_id or not livesync.protected(vm))
    if moved:
        stop_mirror(progress, vm, reason="protection changed")
        _drop_copies(progress, vm, db.session.get(Server, old_server_id), db.session.get(ServerDisk, old_disk_id))
    vm = _vm(vm_id)
    if vm.backup_mode == BackupMode.NONE.value:
        vm.backup_server_id = vm.backup_disk_id = None
        if vm.livesync is not None:
            livesync.mark_unprotected(vm.livesync)
        db.session.commit()
        return f"{vm.name} is not protected"
    return sync(progress, vm_id)


def forget(progress: Progress, vm: VM) -> None:
    """Before a protected VM is deleted: stop its export and remove the copy from the backup server."""
    if vm.backup_server is not None and vm.backup_disk is not None:
        try:
            _drop_copies(progress, vm, vm.backup_server, vm.backup_disk)
        except VmmError as exc:  # the delete goes on; the rest of the VM's files there go with it
            progress.log(f"Stopping the LiveSync export on {vm.backup_server.hostname} failed: {exc}")


def stop_mirror(progress: Progress, vm: VM, *, reason: str) -> None:
    """Stop the VM's mirror (before a migration, a protection change, a failback): the copy is recorded
    stale first; a silent backup is yanked rather than waited for."""
    if vm.livesync is None or vm.backup_server is None or vm.server is None:
        return
    ls = vm.livesync
    if ls.state in (LiveSyncState.IN_SYNC.value, LiveSyncState.SYNCING.value):
        livesync.mark_broken(ls, reason)
        db.session.commit()
    with servers.session_for(vm.server) as primary:
        if not ls_vmm.mirror_status(primary, vm.name):
            return
        progress.log(f"Stopping the LiveSync mirror of {vm.name} ({reason}).")
        if not ls_vmm.reachable(primary, vm.backup_server.address, ls.export_port):
            ls_vmm.mirror_yank(primary, vm.name)
        ls_vmm.mirror_stop(primary, vm.name)


def after_start(progress: Progress, vm_id: int) -> None:
    """A protected VM's QEMU was (re)created (power on, restore, migration): resync in its own task."""
    vm = _vm(vm_id)
    if livesync.protected(vm) and vm.state == VMState.RUNNING.value:
        progress.log("LiveSync: the mirror to the backup server starts in its own task.")
        enqueue_resync(vm, why="after start")


def after_move(progress: Progress, vm_id: int, source_id: int) -> None:
    """A protected VM moved: a VM that was at home makes the target its home; the mirror is re-established."""
    vm = _vm(vm_id)
    if vm.livesync is not None and vm.livesync.home_server_id == source_id:
        vm.livesync.home_server_id = vm.server_id
        db.session.commit()
    after_start(progress, vm_id)


def after_power(progress: Progress, vm_id: int, action: str) -> None:
    """After a power action: a VM that runs gets its mirror (idempotent: a running mirror stays); one
    that was powered off or saved by the operator has no mirror (the copy is no longer followed)."""
    vm = _vm(vm_id)
    if not livesync.protected(vm) or vm.livesync is None:
        return
    if vm.state == VMState.RUNNING.value:
        if action != "resume":
            after_start(progress, vm_id)
    elif vm.state in (VMState.OFF.value, VMState.SAVED.value):
        livesync.mark_unprotected(vm.livesync, "the VM is off; the mirror starts when it runs")
        db.session.commit()


def after_create(progress: Progress, vm_id: int) -> None:
    """A new protected VM: its empty copies and the export on the backup server (the sync runs when it starts)."""
    vm = _vm(vm_id)
    if not livesync.protected(vm):
        return
    try:
        prepare_copies(progress, vm)
    except VmmError as exc:
        livesync.mark_broken(_vm(vm_id).livesync, f"preparing the copy failed: {exc}")
        db.session.commit()
        progress.log(f"LiveSync: preparing the copy failed ({exc}); it is retried when the VM starts.")
        return
    livesync.mark_unprotected(_vm(vm_id).livesync, "the VM is off; the mirror starts when it runs")
    db.session.commit()


@task_job
def failback_vm(progress: Progress, vm_id: int) -> str:
    """Live-migrate a VM running on its H/A backup back to its home server (the guest keeps running),
    then LiveSync runs home -> this server again. The home copy is replaced by the migration's own
    full disk copy (the mirror was stopped, so the copy there is stale by the time it runs)."""
    from .moves import migrate_vm

    vm = _vm(vm_id)
    ls = vm.livesync
    view = livesync.view(vm)
    if not view.on_backup:
        return f"{vm.name} runs on its primary already"
    if not view.failback_ready:
        raise VmmError(f"{vm.name} is not ready to relocate back: its copy on {view.home} is not in sync.")
    home, home_disk = ls.home_server, vm.backup_disk
    here, here_disk = vm.server, vm.disk
    stop_mirror(progress, vm, reason="failing back")
    _drop_copies(progress, vm, home, home_disk)
    # the home server is not the backup during the move (moves refuse a target holding the copy)
    vm = _vm(vm_id)
    vm.backup_server_id = vm.backup_disk_id = None
    db.session.commit()
    try:
        migrate_vm.__wrapped__(progress, vm_id, home.id, home_disk.id, {})
    finally:
        vm = _vm(vm_id)
        moved = vm.server_id == home.id
        vm.backup_server_id = (here if moved else home).id
        vm.backup_disk_id = (here_disk if moved else home_disk).id
        vm.livesync.epoch += 1
        db.session.commit()
    enqueue_resync(vm, why="after failback")
    return f"{vm.name} runs on its primary {home.hostname} again"
