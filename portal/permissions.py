"""Who may see, operate, create and delete what. The one place that decides.

Views and jobs ask these functions; list queries go through the ``visible_*``
filters so that a regular user never sees another user's VMs or tasks in any
list, count, partial or JSON document.
"""

from __future__ import annotations

from functools import wraps

from flask import abort
from flask_login import current_user
from sqlalchemy import Select, or_

from .extensions import db
from .models import VM, Role, Task, User


def is_manager(user: User) -> bool:
    return bool(user.is_authenticated and user.role == Role.MANAGER.value)


# --- VMs ------------------------------------------------------------------

def can_see_vm(user: User, vm: VM) -> bool:
    return is_manager(user) or vm.owner_id == user.id


def can_operate_vm(user: User, vm: VM) -> bool:
    """Power buttons and console: everyone who may see the VM, its owner included."""
    return can_see_vm(user, vm)


def _manager_or_power_owner(user: User, vm: VM) -> bool:
    """What changes a VM's footprint (size, server, existence) is for managers, and power users for their own
    VMs: those who run the servers, and those whose creations a quota bounds. Regular users only operate."""
    return is_manager(user) or (user.role == Role.POWER.value and not user.disabled and vm.owner_id == user.id)


def can_change_settings(user: User, vm: VM) -> bool:
    """Memory, vCPUs and disk sizes: a regular user operates the VMs they were given but does not grow them."""
    return _manager_or_power_owner(user, vm)


def managers() -> list[User]:
    """Who to ask when a page says a manager's action is needed (enabled managers, by name)."""
    return list(db.session.execute(
        db.select(User).where(User.role == Role.MANAGER.value, User.disabled.is_(False)).order_by(User.username)
    ).scalars())


def can_create_vm(user: User) -> bool:
    return user.role in (Role.MANAGER.value, Role.POWER.value) and not user.disabled


def can_delete_vm(user: User, vm: VM) -> bool:
    return _manager_or_power_owner(user, vm)


def can_change_owner(user: User) -> bool:
    return is_manager(user)


def visible_vms(stmt: Select, user: User) -> Select:
    return stmt if is_manager(user) else stmt.where(VM.owner_id == user.id)


# --- Tasks ----------------------------------------------------------------

def _owned_vm_ids(user: User):
    return db.select(VM.id).where(VM.owner_id == user.id).scalar_subquery()


def can_see_task(user: User, task: Task) -> bool:
    if is_manager(user) or task.requester_id == user.id:
        return True
    if task.target_type == "vm" and task.target_id is not None:
        vm = db.session.get(VM, task.target_id)
        return vm is not None and vm.owner_id == user.id
    return False


def can_cancel_task(user: User, task: Task) -> bool:
    return is_manager(user) or task.requester_id == user.id


def visible_tasks(stmt: Select, user: User) -> Select:
    if is_manager(user):
        return stmt
    return stmt.where(
        or_(
            Task.requester_id == user.id,
            (Task.target_type == "vm") & Task.target_id.in_(_owned_vm_ids(user)),
        )
    )


# --- Areas only managers run --------------------------------------------

def can_manage(user: User) -> bool:
    """Servers, the library's contents, users, networks."""
    return is_manager(user)


def manager_required(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        if not is_manager(current_user):
            abort(403)
        return view(*args, **kwargs)

    return wrapper


# --- Loaders that apply the rules --------------------------------------

def get_vm_or_404(vm_id: int) -> VM:
    """The VM if the current user may see it; 404 otherwise (no existence leak)."""
    vm = db.session.get(VM, vm_id)
    if vm is None or not can_see_vm(current_user, vm):
        abort(404)
    return vm


def get_task_or_404(task_id: int) -> Task:
    task = db.session.get(Task, task_id)
    if task is None or not can_see_task(current_user, task):
        abort(404)
    return task


def can_move_vm(user: User, vm: VM) -> bool:
    """Live migration and cold move."""
    return _manager_or_power_owner(user, vm)
