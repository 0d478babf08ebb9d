"""Personal API tokens: created on the Account page, shown once, stored as SHA-256, revocable.

A token is ``corral_`` plus 32 random bytes (URL-safe base64); being random
and long, one fast hash suffices (nothing to slow down a guesser who must
guess 256 bits). Functions flush; the edge commits.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import datetime, timedelta

import redis
from flask import current_app
from sqlalchemy.orm import joinedload

from . import actionlog
from .extensions import db, queues
from .models import ApiToken, User, utcnow

PREFIX = "corral_"
SCOPES = ("read", "write")
MAX_PER_USER = 20


class TokenError(Exception):
    """A token request that cannot be done, with a message for the user."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(user: User, *, name: str, scope: str, expires_in_days: int | None) -> tuple[ApiToken, str]:
    """A new token and its secret (the only time the secret exists outside the client)."""
    name = (name or "").strip()
    if not 1 <= len(name) <= 64:
        raise TokenError("Name the token (1 to 64 characters), e.g. after the script that uses it.")
    if scope not in SCOPES:
        raise TokenError("A token is read-only or read-write.")
    if expires_in_days is not None and not 1 <= expires_in_days <= 3650:
        raise TokenError("A token expires after 1 to 3650 days, or never.")
    live = db.session.execute(db.select(db.func.count()).select_from(ApiToken).where(
        ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))).scalar_one()
    if live >= MAX_PER_USER:
        raise TokenError(f"You have {live} tokens; revoke one first.")
    secret = PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user_id=user.id, name=name, scope=scope, prefix=secret[:12], token_hash=_hash(secret),
                     expires_at=utcnow() + timedelta(days=expires_in_days) if expires_in_days else None)
    db.session.add(token)
    db.session.flush()
    expiry = f", expires {token.expires_at.date().isoformat()}" if token.expires_at else ""
    actionlog.record("api-token-created", target=user, user_id=user.id, detail=f"{name} ({scope}{expiry})")
    return token, secret


def of(user: User) -> list[ApiToken]:
    return list(db.session.execute(db.select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
                                   .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())).scalars())


def revoke(user: User, token_id: int) -> ApiToken:
    token = db.session.get(ApiToken, token_id)
    if token is None or token.user_id != user.id or token.revoked_at is not None:
        raise TokenError("No such token.")
    token.revoked_at = utcnow()
    actionlog.record("api-token-revoked", target=user, user_id=user.id, detail=token.name)
    db.session.flush()
    return token


def is_expired(token: ApiToken, now: datetime | None = None) -> bool:
    return token.expires_at is not None and token.expires_at <= (now or utcnow())


def authenticate(secret: str) -> ApiToken | None:
    """The live token with this secret whose user may still log in (None otherwise); notes its use."""
    if not secret.startswith(PREFIX) or len(secret) > 100:
        return None
    token = db.session.execute(db.select(ApiToken).options(joinedload(ApiToken.user))
                               .where(ApiToken.token_hash == _hash(secret))).scalar_one_or_none()
    if token is None or token.revoked_at is not None or is_expired(token) or token.user.disabled:
        return None
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
        token.last_used_at = now  # at most one write a minute per token (flushed; the edge commits)
        db.session.flush()
    return token


def rate_limited(key: str) -> int:
    """Seconds to wait when ``key`` (a token or a user) made more than ``API_RATE_LIMIT`` requests this minute.

    A fixed one-minute window counted in Redis; 0 means go. Redis being away
    does not stop the API (the pages do not stop either)."""
    limit = int(current_app.config.get("API_RATE_LIMIT") or 0)
    if limit <= 0:
        return 0
    window = int(time.time() // 60)
    name = f"{current_app.config['QUEUE_PREFIX']}:apirate:{key}:{window}"
    try:
        pipe = queues.redis.pipeline()
        pipe.incr(name)
        pipe.expire(name, 120)
        count = pipe.execute()[0]
    except redis.RedisError:  # the API keeps answering without Redis, as the pages do
        return 0
    return 0 if count <= limit else 60 - int(time.time()) % 60
