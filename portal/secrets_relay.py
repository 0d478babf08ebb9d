"""Hand a secret (a root password) from a request to the job that uses it once.

The secret never touches the database, the task row, the job's arguments or a
log: it is encrypted with a key derived from the instance's secret key, put in
Redis under a key that expires in two minutes, and taken (GETDEL) by the job.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from flask import current_app

from .extensions import queues

TTL_SECONDS = 120


class SecretGone(Exception):
    """The secret expired or was already used."""


def _fernet() -> Fernet:
    raw = hashlib.sha256(current_app.config["SECRET_KEY"].encode() + b"/corral-secret-relay").digest()
    return Fernet(base64.urlsafe_b64encode(raw))


def _key(name: str) -> str:
    return f"{current_app.config['QUEUE_PREFIX']}:secret:{name}"


def put(name: str, secret: str) -> None:
    queues.redis.set(_key(name), _fernet().encrypt(secret.encode()), ex=TTL_SECONDS)


def take(name: str) -> str:
    token = queues.redis.getdel(_key(name))
    if token is None:
        raise SecretGone("The password was not available any more (it expires after two minutes); "
                         "start again and type it once more.")
    try:
        return _fernet().decrypt(token).decode()
    except InvalidToken as exc:
        raise SecretGone("The password could not be read back (the instance secret changed).") from exc
