"""One-shot console tokens: what lets a browser's WebSocket reach one VM's console.

The portal mints a token only after the permission check (``permissions.can_operate_vm``);
the token is bound to the user and the VM and the kind of console (``vnc`` or
``serial``), is valid for ``CONSOLE_TOKEN_SECONDS`` and can be redeemed once.
Redis holds only the token's hash (a key that expires by itself); redeeming
is one atomic GETDEL, so a replayed token finds nothing, whichever of two
racing connections came first. Unknown, used and expired tokens are thus the
same thing to the redeemer: absent. A token redeemed by another user than the
one it was minted for is refused (and is spent all the same).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from flask import current_app

from .extensions import queues
from .models import VM, User

KINDS = ("vnc", "serial")


class ConsoleTokenError(Exception):
    """A token that does not open a console; the message says why, for the log (not the browser)."""


@dataclass(frozen=True)
class Grant:
    """What a redeemed token allows: this user, this VM, this kind of console."""

    user_id: int
    vm_id: int
    kind: str


def _key(token: str) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f"{current_app.config['QUEUE_PREFIX']}:console-token:{digest}"


def mint(user: User, vm: VM, kind: str) -> str:
    """A fresh token for *user* on *vm*; the caller has checked the permission."""
    if kind not in KINDS:
        raise ConsoleTokenError(f"unknown console kind {kind!r}")
    token = secrets.token_urlsafe(24)
    grant = {"user_id": user.id, "vm_id": vm.id, "kind": kind}
    queues.redis.set(_key(token), json.dumps(grant), ex=int(current_app.config["CONSOLE_TOKEN_SECONDS"]))
    return token


def redeem(token: str, user_id: int | None, kind: str) -> Grant:
    """Spend *token* for *user_id* (the browser's logged-in user); raise when it opens nothing."""
    if not token or len(token) > 200:
        raise ConsoleTokenError("no token")
    raw = queues.redis.getdel(_key(token))
    if raw is None:
        raise ConsoleTokenError("unknown, used or expired token")
    grant = Grant(**json.loads(raw))
    if user_id is None or grant.user_id != user_id:
        raise ConsoleTokenError(f"token of user {grant.user_id} presented by user {user_id}")
    if grant.kind != kind:
        raise ConsoleTokenError(f"{grant.kind} token presented for a {kind} console")
    return grant
