"""Moving VMs between servers: which servers can take a VM, and recording a move.

Plain functions that flush and never commit. :func:`candidates` says for
every other server whether it can take the VM and why (or why not), from what
the database knows; the job repeats :func:`check_target` right before it acts
and lets the target's hypervisor confirm what only it can see (the CPU model,
bridges and networks) before anything moves.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

from flask import current_app

from . import actionlog, attributes, networks, vms
from .extensions import db
from .models import ACTIVE_TASK_STATES, VM, Server, ServerDisk, ServerStatus, Task, VMState

LIVE, COLD = "live", "cold"
MODES = {LIVE: "Live migration", COLD: "Cold move"}
# Task kind of each move (the poll settles a move whose task died; the API shows running moves).
TASK_KINDS = {LIVE: "vm-migrate", COLD: "vm-move"}
# Which VM states each kind of move starts from.
MODE_STATES = {LIVE: {VMState.RUNNING.value}, COLD: {VMState.RUNNING.value, VMState.OFF.value}}



class MoveError(Exception):
    """A move that cannot be made, with a message for the user."""


def default_options() -> dict:
    """The cluster's migration settings (portal.config: MIGRATION_*) as a migration's options;
    the form may change them per migration."""
    cfg = current_app.config
    return {"bandwidth_mibs": int(cfg["MIGRATION_BANDWIDTH_MIBS"]),
            "max_downtime_ms": int(cfg["MIGRATION_MAX_DOWNTIME_MS"]),
            "time_limit_s": int(cfg["MIGRATION_TIME_LIMIT_SECONDS"]),
            "auto_converge": bool(cfg["MIGRATION_AUTO_CONVERGE"])}


@dataclass
class Candidate:
    """One server as a destination for a VM: eligible when ``problems`` is empty."""

    server: Server
    disk: ServerDisk | None = None
    shared: bool = False  # the VM's disk is verified shared with this server: memory only
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was found fine

    @property
    def eligible(self) -> bool:
        return not self.problems


def active_task(vm: VM, *, besides: int | None = None) -> Task | None:
    """The task that currently holds the VM (every VM task uses the key ``vm:<id>``), other than *besides*."""
    return db.session.execute(
        db.select(Task).where(Task.active_key == f"vm:{vm.id}", Task.state.in_(ACTIVE_TASK_STATES),
                              *([Task.id != besides] if besides else []))
    ).scalar_one_or_none()


def running_move(vm: VM) -> Task | None:
    """The move (migration or cold move) under way for the VM, if any."""
    task = active_task(vm)
    return task if task is not None and task.kind in TASK_KINDS.values() else None


def running_moves_query():
    """Every move under way, newest first (callers narrow it with the permission rules)."""
    return (db.select(Task).where(Task.kind.in_(list(TASK_KINDS.values())), Task.state.in_(ACTIVE_TASK_STATES))
            .order_by(Task.id.desc()))


def mode_problem(vm: VM, mode: str, *, own_task: int | None = None) -> str | None:
    """Why the VM cannot be moved this way at all (its state, its server, a running task), or None.

    The move's own task (*own_task*) does not count as another task."""
    if mode not in MODES:
        return f"Unknown kind of move {mode!r}."
    if vm.state not in MODE_STATES[mode]:
        need = "runs" if mode == LIVE else "runs or is off"
        return f"{MODES[mode]} is possible when {vm.name} {need}; it is {vm.state_enum.label}."
    if vm.server is None or vm.disk is None:
        return f"{vm.name} has no server or VM disk recorded."
    if vm.server.status != ServerStatus.UP.value:
        return f"{vm.name}'s server {vm.server.hostname} is {vm.server.status_enum.label}."
    task = active_task(vm, besides=own_task)
    if task is not None:
        return f"{vm.name} is busy with task {task.id} ({task.title}); try again when it ends."
    return None


def _free_gb(disk: ServerDisk) -> int:
    return disk.free_gb if disk.free_gb is not None else disk.size_gb


def shared_with(vm: VM, server: Server) -> ServerDisk | None:
    """The target's disk that is the same verified storage as the VM's disk (same mountpoint)."""
    source = vm.disk
    if source is None or not source.shared_group:
        return None
    return next((d for d in server.disks if d.shared_group == source.shared_group
                 and d.mountpoint == source.mountpoint), None)


def assess(vm: VM, server: Server, mode: str, disk_id: int | None = None) -> Candidate:
    """Whether *server* can take the VM, with every reason (see :class:`Candidate`)."""
    c = Candidate(server)
    if server.id == vm.server_id:
        c.problems.append("the VM is here already")
        return c
    if server.id == vm.backup_server_id and vm.backup_mode != "none":
        c.problems.append("it holds the VM's LiveSync copy (choose another backup server first)")
    if server.status != ServerStatus.UP.value:
        c.problems.append(f"server is {server.status_enum.label}")
    else:
        c.checks.append("up")
    if vm.state == VMState.RUNNING.value:
        free_mem = server.free_memory_mb if server.free_memory_mb is not None else server.memory_mb
        if free_mem < vm.memory_mb:
            c.problems.append(f"{free_mem} MB free memory, the VM needs {vm.memory_mb} MB")
        else:
            c.checks.append(f"{free_mem} MB free memory")
    _assess_disk(vm, server, mode, disk_id, c)
    _assess_cpu(vm, server, c)
    nets = {n.network.id: n.network for n in vm.nics if n.network is not None}
    c.problems.extend(p for p in (networks.carry_problem(net, server) for net in nets.values()) if p)
    c.checks.append(f"networks {', '.join(sorted(n.name for n in nets.values()))} made on the server before "
                    "anything moves" if nets else "user-mode networking only: no bridge needed")
    return c


def _assess_disk(vm: VM, server: Server, mode: str, disk_id: int | None, c: Candidate) -> None:
    shared = shared_with(vm, server) if mode == LIVE else None
    if shared is not None and disk_id in (None, shared.id):
        c.disk, c.shared = shared, True
        c.checks.append(f"{shared.mountpoint} is verified shared storage: memory only")
        return
    need = vm.disk_gb
    disks = [d for d in server.disks if disk_id in (None, d.id)]
    if not disks:
        c.problems.append("no such VM disk on this server" if disk_id else "no VM disk declared")
        return
    fits = [d for d in disks if _free_gb(d) >= need]
    if not fits:
        c.problems.append(f"no VM disk with {need} GB free (most: {max(_free_gb(d) for d in disks)} GB)")
        return
    # Prefer the same mountpoint (same paths), then the most free space.
    fits.sort(key=lambda d: (d.mountpoint == vm.disk.mountpoint, _free_gb(d)), reverse=True)
    c.disk = fits[0]
    c.checks.append(f"{c.disk.mountpoint} has {_free_gb(c.disk)} GB free, the disks need {need} GB "
                    "(copied along)")


def _assess_cpu(vm: VM, server: Server, c: Candidate) -> None:
    source_type = vm.server.domain_type if vm.server else "qemu"
    if source_type == "qemu":
        # Under TCG guests are defined with the emulated qemu64 model: any server runs it.
        c.checks.append("CPU qemu64 is emulated (TCG): runs on any server")
    elif server.domain_type != "kvm":
        c.problems.append("the VM runs under KVM; this server has only TCG")
    else:
        c.checks.append("CPU model compared by the server's hypervisor before anything moves")


def candidates(vm: VM, mode: str) -> list[Candidate]:
    """Every other server with its eligibility, eligible ones first."""
    servers = db.session.execute(db.select(Server).where(Server.id != vm.server_id)
                                 .order_by(Server.hostname)).scalars().all()
    found = [assess(vm, s, mode) for s in servers]
    return sorted(found, key=lambda c: not c.eligible)


def check_target(vm: VM, mode: str, server_id: int, disk_id: int | None = None, *,
                 own_task: int | None = None) -> Candidate:
    """The eligible destination, or :class:`MoveError` saying why not."""
    problem = mode_problem(vm, mode, own_task=own_task)
    if problem:
        raise MoveError(problem)
    server = db.session.get(Server, server_id)
    if server is None:
        raise MoveError("Choose the destination server from the list.")
    c = assess(vm, server, mode, disk_id)
    if not c.eligible:
        raise MoveError(f"{server.hostname} cannot take {vm.name}: {'; '.join(c.problems)}.")
    return c


def submit(vm: VM, cand: Candidate, mode: str, options: dict, requester_id: int | None):
    """The move as a task on the VM's one slot (``vm:<id>``): live migration or cold move to a checked
    candidate (flushes; the edge commits, then enqueues). Pages and API alike."""
    from . import tasks
    from .jobs.moves import migrate_vm, move_vm

    if mode == LIVE:
        return tasks.submit(TASK_KINDS[LIVE], migrate_vm, title=f"Migrate {vm.name} to {cand.server.hostname}",
                            requester_id=requester_id, target=vm, key=f"vm:{vm.id}",
                            args=(vm.id, cand.server.id, cand.disk.id, options, requester_id))
    return tasks.submit(TASK_KINDS[COLD], move_vm, title=f"Move {vm.name} to {cand.server.hostname}",
                        requester_id=requester_id, target=vm, key=f"vm:{vm.id}",
                        args=(vm.id, cand.server.id, cand.disk.id, requester_id))


# --- where things land ---------------------------------------------------------------

def _moved_path(path: str, source: ServerDisk, target: ServerDisk) -> str:
    rel = posixpath.relpath(path, source.mountpoint)
    if rel.startswith(".."):
        raise MoveError(f"{path} is not on the VM disk {source.mountpoint}.")
    return posixpath.join(target.mountpoint, rel)


def cached_files(vm: VM) -> list[str]:
    """The shared read-only files the VM uses on its server disk: clone bases and its ISO."""
    files = sorted({d.backing_path for d in vm.vdisks if d.backing_path})
    if vm.iso is not None:
        files.append(vms.iso_path(vm.disk, vm.iso))
    return files


def target_paths(vm: VM, target: ServerDisk) -> dict[str, str]:
    """Every file of the VM (disks, clone bases, cached ISO) -> its path on the target disk."""
    paths = {d.path: vms.disk_path(SimpleNamespace(name=vm.name, disk=target), d.position) for d in vm.vdisks}
    paths.update({f: _moved_path(f, vm.disk, target) for f in cached_files(vm)})
    if attributes.wants_seed(vm):  # rendered afresh on the target (jobs/moves.py), never copied
        paths[vms.seed_path(vm)] = vms.seed_path(SimpleNamespace(name=vm.name, disk=target))
    return paths


def record_moved(vm: VM, server: Server, disk: ServerDisk, paths: dict[str, str], *, how: str,
                 user_id: int | None) -> None:
    """The VM now lives on *server*/*disk*: its rows follow (flushes). Called only once the
    target runs (or holds) the VM."""
    source = vm.server.hostname
    vm.server_id, vm.disk_id = server.id, disk.id
    for d in vm.vdisks:
        d.path = paths.get(d.path, d.path)
        if d.backing_path:
            d.backing_path = paths.get(d.backing_path, d.backing_path)
    actionlog.record("vm-moved", target=vm, user_id=user_id, detail=f"{how}: {source} -> {server.hostname}")
    db.session.flush()


def rehome(vm: VM, server: Server, disk_paths: list[str], *, how: str) -> None:
    """Record that libvirt runs the VM on *server* from *disk_paths* (its writable disks in
    order, as the definition there says) although Corral had it elsewhere (flushes).

    Raises :class:`MoveError` when the paths are on no VM disk of that server."""
    if len(disk_paths) != len(vm.vdisks):
        raise MoveError(f"{vm.name} on {server.hostname} has {len(disk_paths)} disk(s), Corral knows "
                        f"{len(vm.vdisks)}.")
    disk = next((d for d in server.disks if disk_paths and disk_paths[0].startswith(d.mountpoint.rstrip("/") + "/")),
                None)
    if disk is None:
        raise MoveError(f"{vm.name} runs on {server.hostname} from {disk_paths[:1]}, on none of its VM disks.")
    paths = {d.path: new for d, new in zip(sorted(vm.vdisks, key=lambda d: d.position), disk_paths)}
    if vm.disk is not None:
        for f in cached_files(vm):
            try:
                paths[f] = _moved_path(f, vm.disk, disk)
            except MoveError:
                pass
    record_moved(vm, server, disk, paths, how=how, user_id=None)


# --- shared storage -----------------------------------------------------------------

def shared_partners(disk: ServerDisk) -> list[ServerDisk]:
    """Other servers' VM disks with the same mountpoint (candidates for a shared-storage claim)."""
    return db.session.execute(
        db.select(ServerDisk).join(Server).where(ServerDisk.mountpoint == disk.mountpoint,
                                                 ServerDisk.server_id != disk.server_id).order_by(Server.hostname)
    ).scalars().all()


def check_shared_claim(disk: ServerDisk, other: ServerDisk | None) -> None:
    """Raise :class:`MoveError` unless the claim "*disk* and *other* are one storage" can be verified."""
    if other is None or other.server_id == disk.server_id:
        raise MoveError("Choose another server's VM disk.")
    if other.mountpoint != disk.mountpoint:
        raise MoveError(f"Shared storage has the same path on every server: {other.mountpoint} is not "
                        f"{disk.mountpoint}.")
    if disk.shared_group and disk.shared_group == other.shared_group:
        raise MoveError(f"{disk.mountpoint} on {disk.server.hostname} and {other.server.hostname} is recorded "
                        "as shared already.")
    for d in (disk, other):
        if d.server.status != ServerStatus.UP.value:
            raise MoveError(f"{d.server.hostname} is {d.server.status_enum.label}: Corral cannot verify the claim.")


def record_shared(disk: ServerDisk, other: ServerDisk, *, user_id: int | None) -> str:
    """Record the verified claim: both disks (and the disks already sharing with either) in one group
    (flushes). Returns the group."""
    groups = {g for g in (disk.shared_group, other.shared_group) if g}
    group = sorted(groups)[0] if groups else uuid.uuid4().hex[:16]
    members = [disk, other]
    if groups:
        members += db.session.execute(db.select(ServerDisk).where(ServerDisk.shared_group.in_(groups))).scalars().all()
    for d in members:
        d.shared_group = group
    actionlog.record("disk-shared", target=disk.server, user_id=user_id,
                     detail=f"{disk.mountpoint} verified shared with {other.server.hostname}")
    db.session.flush()
    return group


# --- evacuating a server ------------------------------------------------------------

EVACUATE_AT_ONCE = 2  # migrations an evacuation runs at the same time


@dataclass
class EvacuationItem:
    """One VM of a server being evacuated: where it goes (``target``) or why it stays (``reason``)."""

    vm: VM
    target: Candidate | None = None
    reason: str | None = None


def evacuation_plan(server: Server) -> list[EvacuationItem]:
    """Every VM on *server*: each running one with the eligible server that has the most free
    memory left once the VMs planned before it are counted (largest VMs first), or why it stays."""
    on_it = db.session.execute(db.select(VM).where(VM.server_id == server.id)
                               .order_by(VM.memory_mb.desc(), VM.name)).scalars().all()
    planned: dict[int, int] = {}
    plan = []
    for vm in on_it:
        if vm.state != VMState.RUNNING.value:
            plan.append(EvacuationItem(vm, reason=f"it is {vm.state_enum.label}: only running VMs migrate "
                                                  "(a cold move takes it elsewhere)"))
            continue
        problem = mode_problem(vm, LIVE)
        if problem:
            plan.append(EvacuationItem(vm, reason=problem))
            continue
        found = candidates(vm, LIVE)

        def room(c: Candidate) -> int:
            free = c.server.free_memory_mb if c.server.free_memory_mb is not None else c.server.memory_mb
            return free - planned.get(c.server.id, 0)

        fits = [c for c in found if c.eligible and room(c) >= vm.memory_mb]
        if not fits:
            why = "; ".join(f"{c.server.hostname}: {', '.join(c.problems) or 'memory taken by VMs moving there'}"
                            for c in found) or "there is no other server"
            plan.append(EvacuationItem(vm, reason=f"no server can take it ({why})"))
            continue
        best = max(fits, key=room)
        planned[best.server.id] = planned.get(best.server.id, 0) + vm.memory_mb
        plan.append(EvacuationItem(vm, target=best))
    return plan
