"""Jobs that move a VM to another server: live migration and cold move.

Both hold the VM in state ``migrating`` (the monitor and the poll leave such
a VM alone), let :mod:`portal.vmm.migrate` act on the two servers, and change
the VM's server, disk and paths in one commit only after the target runs (or
holds) the VM. The source's files go afterwards; a cached clone base or ISO
goes only when no other VM on that server disk uses it (as on delete). A
failure leaves the VM on the source in the state libvirt reports there.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from .. import moves, servers, tasks, vms
from ..extensions import db
from ..models import VM, Server, ServerDisk, VMState, utcnow
from ..vmm import domains, images, migrate
from ..vmm.domains import DomainState
from ..vmm.errors import VmmError
from . import Progress, task_job
from . import livesync as livesync_jobs
from . import networks as network_jobs
from . import vms as vm_jobs
from .vms import _unshared_caches

MIB = 1 << 20


def _vm(vm_id: int) -> VM:
    vm = db.session.get(VM, vm_id)
    if vm is None:
        raise LookupError("the VM was deleted meanwhile")
    return vm


def _set_state(vm: VM, state: VMState) -> None:
    """Flushes: Progress.step expires the session (a cancel check), which would drop the change."""
    vm.state, vm.state_changed_at = state.value, utcnow()
    db.session.flush()


@dataclass
class _Plan:
    """A move as checked at its start: where from, where to, which files go where."""

    cand: moves.Candidate
    source: Server
    name: str
    source_dir: str
    mountpoint: str
    paths: dict[str, str]
    caches: list[str]  # cached bases/ISO on the source no other VM there uses
    prepared: migrate.PreparedTarget = field(default_factory=migrate.PreparedTarget)


def _begin(progress: Progress, vm_id: int, mode: str, server_id: int, disk_id: int | None) -> _Plan:
    """Check the destination again (things change while a task waits) and take the VM."""
    vm = _vm(vm_id)
    cand = moves.check_target(vm, mode, server_id, disk_id, own_task=progress.task_id)
    memory_only = cand.shared
    plan = _Plan(cand, vm.server, vm.name, vms.vm_dir(vm, vm.disk), vm.disk.mountpoint,
                 {} if memory_only else moves.target_paths(vm, cand.disk),
                 [] if memory_only else _unshared_caches(vm))
    _set_state(vm, VMState.MIGRATING)
    progress.step(f"{moves.MODES[mode]} of {vm.name}: {vm.server.hostname} -> {cand.server.hostname}", 2)
    return plan


def _check_target(progress: Progress, plan: _Plan, src, dst) -> str:
    """What only the target's hypervisor can tell: CPU model, bridges and networks. Returns the domain XML."""
    progress.step(f"Checking {plan.cand.server.hostname}: CPU, bridges", 4)
    xml = migrate.migratable_xml(src, plan.name)
    progress.log(migrate.check_cpu(dst, xml))
    vm = db.session.execute(db.select(VM).where(VM.name == plan.name)).scalar_one()
    network_jobs.ensure_for(progress, dst, vm, plan.cand.server)
    migrate.check_bridges(dst, xml)
    return xml


def _put_caches(progress: Progress, vm: VM, src, dst, paths: dict[str, str], prepared: migrate.PreparedTarget) -> None:
    """The clone bases and ISO the VM uses, on the target first (reusing a cached copy)."""
    for path in moves.cached_files(vm):
        name = posixpath.basename(path)
        if migrate.ensure_cached(src, dst, path, paths[path], prepared=prepared):
            progress.log(f"Copied {name} to {dst.target.hostname} (verified).")
        else:
            progress.log(f"{name} is cached on {dst.target.hostname} already.")
    seed_at = paths.get(vms.seed_path(vm))
    if seed_at:  # the cloud-init seed: rendered again on the target rather than copied
        migrate.make_dir(dst, posixpath.dirname(seed_at), prepared)
        vm_jobs.write_seed(progress, dst, vm, at=seed_at)
        prepared.files.append(seed_at)


def _commit_move(vm_id: int, plan: _Plan, how: str, state: VMState, user_id: int | None) -> None:
    """The VM's server, disk, paths and state follow the move, in one commit."""
    vm = _vm(vm_id)
    moves.record_moved(vm, plan.cand.server, plan.cand.disk, plan.paths, how=how, user_id=user_id)
    _set_state(vm, state)
    db.session.commit()


def _clean_source(progress: Progress, plan: _Plan) -> None:
    """Remove the VM's definition and files from the source after a move (problems are logged: the move stands)."""
    source, caches = plan.source, plan.caches
    try:
        with servers.session_for(source) as session:
            domains.undefine(session, plan.name)
            network_jobs.release_idle(progress, session, source)
            images.remove_tree(session, plan.source_dir, under=plan.mountpoint)
            if caches:
                progress.log(f"Removing cached {', '.join(posixpath.basename(p) for p in caches)} from "
                             f"{source.hostname}: no other VM there uses it.")
                images.remove_cached(session, caches)
    except VmmError as exc:
        progress.log(f"The VM moved, but cleaning {source.hostname} failed: {exc}")


def _failed(vm_id: int, source_id: int, name: str) -> None:
    """After a failed move: the VM is on its source, in the state libvirt reports there."""
    db.session.rollback()
    vm = _vm(vm_id)
    try:
        with servers.session_for(db.session.get(Server, source_id)) as session:
            found = domains.state(session, name)
    except VmmError:
        found = DomainState.UNKNOWN
    new = {DomainState.RUNNING: VMState.RUNNING, DomainState.SHUTOFF: VMState.OFF, DomainState.SAVED: VMState.SAVED,
           DomainState.PAUSED: VMState.PAUSED}.get(found, VMState.UNKNOWN)
    _set_state(vm, new)
    db.session.commit()


@task_job
def migrate_vm(progress: Progress, vm_id: int, server_id: int, disk_id: int | None, options: dict,
               user_id: int | None = None) -> str:
    """Live-migrate a running VM (memory only on verified shared storage, else with its disks)."""
    plan = _begin(progress, vm_id, moves.LIVE, server_id, disk_id)
    vm, target, disk, name, paths = _vm(vm_id), plan.cand.server, plan.cand.disk, plan.name, plan.paths
    livesync_jobs.stop_mirror(progress, vm, reason="stopped for a live migration")
    incremental = any(d.backing_path for d in vm.vdisks)
    try:
        with servers.session_for(plan.source) as src, servers.session_for(target) as dst:
            migrate.connect(src, dst)
            xml = _check_target(progress, plan, src, dst)
            if not plan.cand.shared:
                _put_caches(progress, vm, src, dst, paths, plan.prepared)
                progress.step(f"Creating the disks on {target.hostname}:{disk.mountpoint}", 8)
                migrate.precreate_disks(dst, migrate.inspect_disks(src, name), paths, incremental=incremental,
                                        prepared=plan.prepared)
            opts = migrate.MigrationOptions(
                storage="shared" if plan.cand.shared else "local", incremental=incremental,
                unsafe=plan.cand.shared, bandwidth_mibs=int(options.get("bandwidth_mibs") or 0),
                max_downtime_ms=int(options.get("max_downtime_ms") or 0),
                auto_converge=bool(options.get("auto_converge")),
                time_limit_s=float(options.get("time_limit_s") or 0),
                dest_xml=migrate.retarget_xml(xml, paths) if any(a != b for a, b in paths.items()) else None)
            progress.step("Migrating" + (" memory" if plan.cand.shared else " memory and disks"), 10)

            def report(p: migrate.JobProgress) -> None:
                progress.task.step = f"Migrating: {p.describe()}"
                db.session.flush()
                progress.bytes(p.data_processed, max(p.data_total, p.data_processed, 1), pct_from=10, pct_to=95)

            result = migrate.live_migrate(src, dst, name, opts, on_progress=report, check=progress.check_cancel,
                                          prepared=plan.prepared)
    except BaseException:
        _failed(vm_id, plan.source.id, name)
        livesync_jobs.after_start(progress, vm_id)
        raise
    # libvirt confirmed the target runs it: the rows follow, in one commit.
    _commit_move(vm_id, plan, "live migration", VMState.RUNNING, user_id)
    livesync_jobs.after_move(progress, vm_id, plan.source.id)
    figures = [f"{result.seconds:.1f} s"]
    if result.downtime_ms is not None:
        figures.append(f"downtime {result.downtime_ms} ms")
    if result.data_transferred:
        figures.append(f"{result.data_transferred / MIB:.0f} MiB transferred")
    progress.log(f"{name} runs on {target.hostname} ({', '.join(figures)}).")
    if not plan.cand.shared:
        progress.step(f"Removing {name}'s files from {plan.source.hostname}", 97)
        _clean_source(progress, plan)
    return f"{name} on {target.hostname}"


@task_job
def move_vm(progress: Progress, vm_id: int, server_id: int, disk_id: int | None, user_id: int | None = None) -> str:
    """Cold move: save a running VM, copy disks and memory state (verified), restore on the target."""
    plan = _begin(progress, vm_id, moves.COLD, server_id, disk_id)
    vm, target, disk, name, paths = _vm(vm_id), plan.cand.server, plan.cand.disk, plan.name, plan.paths
    livesync_jobs.stop_mirror(progress, vm, reason="stopped for a move")
    try:
        with servers.session_for(plan.source) as src, servers.session_for(target) as dst:
            migrate.connect(src, dst)
            xml = _check_target(progress, plan, src, dst)
            _put_caches(progress, vm, src, dst, paths, plan.prepared)
            target_dir = vms.vm_dir(vm, disk)
            migrate.make_dir(dst, target_dir, plan.prepared)
            progress.step(f"Saving memory if it runs, copying the disks to {target.hostname} (verified)", 10)
            was_running = migrate.cold_move(
                src, dst, name, copies=[(d.path, paths[d.path]) for d in vm.vdisks],
                xml=migrate.retarget_xml(xml, paths), state_dir=target_dir,
                progress=lambda n, t: progress.bytes(n, t, pct_from=10, pct_to=90), check=progress.check_cancel,
                prepared=plan.prepared)
    except BaseException:
        _failed(vm_id, plan.source.id, name)
        raise
    _commit_move(vm_id, plan, "cold move", VMState.RUNNING if was_running else VMState.OFF, user_id)
    livesync_jobs.after_move(progress, vm_id, plan.source.id)
    progress.log(f"{name} is on {target.hostname}" + (" and resumed." if was_running else "."))
    progress.step(f"Removing {name} from {plan.source.hostname}", 95)
    _clean_source(progress, plan)
    return f"{name} on {target.hostname}"


@task_job
def verify_shared_disk(progress: Progress, disk_id: int, other_id: int, user_id: int | None = None) -> str:
    """Verify that two servers' VM disks are one storage (a marker written on each is read on the
    other) and only then record them as shared; a failed check records nothing and says why."""
    disk, other = db.session.get(ServerDisk, disk_id), db.session.get(ServerDisk, other_id)
    if disk is None or other is None:
        raise LookupError("the VM disk was removed meanwhile")
    moves.check_shared_claim(disk, other)
    a, b, mountpoint = disk.server, other.server, disk.mountpoint
    progress.step(f"Writing a marker in {mountpoint} on {a.hostname}, reading it on {b.hostname} and back", 20)
    with servers.session_for(a) as sa, servers.session_for(b) as sb:
        for one, two in ((sa, sb), (sb, sa)):
            if not migrate.verify_shared(one, two, mountpoint):
                raise moves.MoveError(
                    f"{mountpoint} is not shared between {a.hostname} and {b.hostname}: a marker written there on "
                    f"{one.target.hostname} is not in {mountpoint} on {two.target.hostname}. Nothing was recorded.")
    group = moves.record_shared(_reload(ServerDisk, disk_id), _reload(ServerDisk, other_id), user_id=user_id)
    db.session.commit()
    progress.log(f"{mountpoint} on {a.hostname} and {b.hostname} is verified shared storage (group {group}): "
                 "VMs on it migrate memory only.")
    return group


def _reload(model, row_id: int):
    row = db.session.get(model, row_id)
    if row is None:
        raise LookupError("the VM disk was removed meanwhile")
    return row


@task_job
def evacuate_server(progress: Progress, server_id: int, options: dict, user_id: int | None = None) -> str:
    """Live-migrate every running VM off a server, a few at a time, then mark it down.

    Each migration is its own ``vm-migrate`` task (the VM's page and the API show its progress),
    run here rather than queued, so that an evacuation never waits for a free worker. The task's
    log and result say what moved where and what stayed, and why."""
    server = db.session.get(Server, server_id)
    if server is None:
        raise LookupError("the server was deleted meanwhile")
    hostname = server.hostname
    plan = moves.evacuation_plan(server)
    progress.step(f"Evacuating {hostname}: {sum(1 for i in plan if i.target)} of {len(plan)} VM(s) to migrate", 2)
    stayed, runs = [], []
    for item in plan:
        if item.target is None:
            stayed.append(f"{item.vm.name}: {item.reason}")
            progress.log(f"{item.vm.name} stays: {item.reason}.")
            continue
        vm, cand = item.vm, item.target
        sub = tasks.submit(moves.TASK_KINDS[moves.LIVE], migrate_vm,
                           title=f"Migrate {vm.name} to {cand.server.hostname} (evacuating {hostname})",
                           requester_id=user_id, target=vm, key=f"vm:{vm.id}")
        if not sub.created:
            stayed.append(f"{vm.name}: busy with task {sub.task.id}")
            continue
        sub.task.job_id = None  # run here, not queued: no RQ job of its own to reconcile against
        runs.append((sub.task.id, vm.id, vm.name, cand.server.id, cand.disk.id, cand.server.hostname))
        progress.log(f"{vm.name} -> {cand.server.hostname} (task {sub.task.id}).")
    db.session.commit()

    def run(item) -> str | None:
        task_id, vm_id, _name, target_id, disk_id, _host = item
        try:
            migrate_vm(task_id, vm_id, target_id, disk_id, options, user_id)
        except Exception as exc:  # noqa: BLE001 - the VM's own task recorded it; the report says it
            return str(exc) or type(exc).__name__
        return None

    moved = []
    with ThreadPoolExecutor(max_workers=moves.EVACUATE_AT_ONCE) as pool:
        futures = {pool.submit(run, item): item for item in runs}
        for done, future in enumerate(as_completed(futures), 1):
            _tid, _vm, name, _sid, _did, host = futures[future]
            error = future.result()
            if error is None:
                moved.append(f"{name} -> {host}")
                progress.log(f"{name} runs on {host}.")
            else:
                stayed.append(f"{name}: migrating to {host} failed: {error}")
                progress.log(f"{name} stays: migrating to {host} failed: {error}")
            progress.items(done, len(runs), pct_from=5, pct_to=95, noun="VMs")
    server = db.session.get(Server, server_id)
    left = db.session.execute(db.select(db.func.count(VM.id)).where(
        VM.server_id == server_id, VM.state.in_([VMState.RUNNING.value, VMState.PAUSED.value,
                                                  VMState.MIGRATING.value]))).scalar_one()
    if left:
        progress.log(f"{hostname} is not marked down: {left} VM(s) still run there.")
    else:
        servers.mark_down(server)
        db.session.commit()
        progress.log(f"{hostname} is marked down: no VM runs there any more.")
    report = f"Moved {len(moved)}: {', '.join(moved) or 'none'}. Stayed {len(stayed)}: {'; '.join(stayed) or 'none'}."
    progress.log(report)
    return report
