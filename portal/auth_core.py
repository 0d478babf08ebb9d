"""Passwords, sessions and login throttling.

Passwords are hashed with scrypt (Werkzeug). Failed logins are counted per
account and per client address in Redis; after a few free failures each
further attempt must wait an exponentially growing delay, so guessing is
slowed down without locking the real owner out for long.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import redis
from flask import Flask, current_app
from werkzeug.security import check_password_hash, generate_password_hash

from .extensions import db, login_manager, queues
from .models import User

log = logging.getLogger(__name__)

@functools.cache
def _dummy_hash() -> str:
    """Verifying against this keeps the timing of "no such user" like a real check (made on first
    use: every process imports this module, few log anyone in)."""
    return generate_password_hash("corral-dummy-password", method="scrypt")


def init_app(app: Flask) -> None:
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please log in to continue."
    login_manager.login_message_category = "info"
    login_manager.session_protection = "basic"


@login_manager.user_loader
def load_user(token: str) -> User | None:
    try:
        user_id, version = (int(x) for x in token.split(":"))
    except ValueError:
        return None
    user = db.session.get(User, user_id)
    if user is None or user.disabled or user.session_version != version:
        return None
    return user


def hash_password(password: str) -> str:
    return generate_password_hash(password, method="scrypt")


def verify_password(user: User | None, password: str) -> bool:
    if user is None:
        check_password_hash(_dummy_hash(), password)
        return False
    return check_password_hash(user.password_hash, password)


def password_problem(password: str) -> str | None:
    minimum = current_app.config["PASSWORD_MIN_LENGTH"]
    if len(password) < minimum:
        return f"Passwords need at least {minimum} characters."
    if len(password) > 256:
        return "Passwords may have at most 256 characters."
    return None


class LoginThrottle:
    """Counts failures per account and per address; tells how long to wait."""

    def __init__(self) -> None:
        cfg = current_app.config
        self.window = int(cfg["LOGIN_FAILURE_WINDOW_SECONDS"])
        self.max_delay = int(cfg["LOGIN_MAX_DELAY_SECONDS"])
        self.free = {"user": int(cfg["LOGIN_FREE_FAILURES"]), "addr": int(cfg["LOGIN_ADDRESS_FREE_FAILURES"])}
        self.prefix = f"{cfg['QUEUE_PREFIX']}:loginfail"

    def _keys(self, username: str, address: str) -> dict[str, str]:
        return {"user": f"{self.prefix}:user:{username.lower()}", "addr": f"{self.prefix}:addr:{address}"}

    def wait_seconds(self, username: str, address: str, now: float | None = None) -> int:
        """Seconds the caller must still wait before another attempt (0: go)."""
        now = time.time() if now is None else now
        try:
            pipe = queues.redis.pipeline()
            keys = self._keys(username, address)
            for key in keys.values():
                pipe.hmget(key, "count", "last")
            rows = pipe.execute()
        except redis.RedisError as exc:  # throttling must not lock everyone out
            log.warning("login throttle unavailable: %s", exc)
            return 0
        wait = 0.0
        for kind, (count, last) in zip(("user", "addr"), rows):
            if count is None:
                continue
            over = int(count) - self.free[kind]
            if over < 0:
                continue
            delay = min(2 ** over, self.max_delay)
            wait = max(wait, float(last) + delay - now)
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, username: str, address: str) -> None:
        try:
            pipe = queues.redis.pipeline()
            for key in self._keys(username, address).values():
                pipe.hincrby(key, "count", 1)
                pipe.hset(key, "last", time.time())
                pipe.expire(key, self.window)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("login throttle unavailable: %s", exc)

    def succeeded(self, username: str) -> None:
        try:
            queues.redis.delete(self._keys(username, "")["user"])
        except redis.RedisError as exc:
            log.warning("login throttle unavailable: %s", exc)


@login_manager.unauthorized_handler
def _unauthorized():
    from flask import flash, jsonify, redirect, request, url_for

    if request.blueprint == "api":
        return jsonify({"error": "authentication required"}), 401
    if request.headers.get("HX-Request"):
        # A partial polled after the session ended: send the browser to login.
        resp = jsonify({})
        resp.status_code = 401
        resp.headers["HX-Redirect"] = url_for("auth.login")
        return resp
    flash(login_manager.login_message, login_manager.login_message_category)
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
