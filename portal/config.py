"""Configuration: defaults in code, then ``instance/config.py``, then ``CORRAL_*``.

Every setting below can be overridden by an environment variable of the same
name prefixed with ``CORRAL_`` (``CORRAL_REDIS_URL``, ``CORRAL_POLL_SECONDS``).
Values are parsed as JSON when they parse (numbers, booleans, lists) and kept
as strings otherwise. ``CORRAL_DATABASE_URL`` sets ``SQLALCHEMY_DATABASE_URI``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

ENV_PREFIX = "CORRAL_"

# Environment names that map onto differently named Flask/extension keys.
ENV_ALIASES = {"DATABASE_URL": "SQLALCHEMY_DATABASE_URI"}


class Defaults:
    # Database: SQLite in the instance folder unless CORRAL_DATABASE_URL is set.
    SQLALCHEMY_DATABASE_URI: str | None = None  # filled in by load_config
    SQLALCHEMY_ENGINE_OPTIONS: dict = {}

    # Redis (RQ queues, login throttling). `corral up` starts a private
    # redis-server on this address when nothing answers there.
    REDIS_URL = "redis://127.0.0.1:6379/0"
    QUEUE_PREFIX = "corral"

    # Tasks
    TASK_TIMEOUT_SECONDS = 6 * 3600
    TASK_RESULT_TTL_SECONDS = 7 * 24 * 3600
    TASK_FAILURE_TTL_SECONDS = 30 * 24 * 3600
    TASK_POLL_MS = 1000

    # Pages
    PAGE_SIZE = 50
    SUMMARY_REFRESH_SECONDS = 5

    # Security
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    SESSION_COOKIE_NAME = "corral_session"
    REMEMBER_COOKIE_HTTPONLY = True
    REMEMBER_COOKIE_SAMESITE = "Lax"
    PERMANENT_SESSION_LIFETIME = 12 * 3600
    WTF_CSRF_TIME_LIMIT = None  # tied to the session instead
    LOGIN_FREE_FAILURES = 3  # failures before an account/address is slowed
    LOGIN_MAX_DELAY_SECONDS = 300
    LOGIN_FAILURE_WINDOW_SECONDS = 900
    LOGIN_ADDRESS_FREE_FAILURES = 20
    PASSWORD_MIN_LENGTH = 10

    # Default quotas for new power users
    DEFAULT_MAX_VMS = 5
    DEFAULT_MAX_MEMORY_MB = 8192
    DEFAULT_MAX_DISK_GB = 200

    # Monitoring
    POLL_SECONDS = 30  # how often every server is polled
    POLL_THREADS = 16  # servers probed at once
    SERVER_DOWN_GRACE_SECONDS = 60  # silence before a server counts as down
    MEM_FREE_WARNING = 10.0  # % free memory (check_vmm_host -w/-c)
    MEM_FREE_CRITICAL = 5.0
    DISK_FREE_WARNING = 10.0
    DISK_FREE_CRITICAL = 5.0
    LOAD_WARNING = 4.0  # 1-minute load per CPU
    LOAD_CRITICAL = 8.0
    # Where the test appliance is built and cached (None: /var/cache/corral-appliance)
    APPLIANCE_CACHE: str | None = None
    # The published appliance catalog (a JSON index); managers can change it on the Library page
    CATALOG_URL = ""
    # hostname -> libvirt URI, to reach a server's libvirtd another way than qemu+ssh
    LIBVIRT_URI_OVERRIDES: dict = {}

    # Web server used by `corral up`
    BIND = "127.0.0.1:5000"


def _parse(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def env_overrides(environ: dict[str, str] | None = None) -> dict:
    environ = os.environ if environ is None else environ
    out = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX:
            continue
        name = key[len(ENV_PREFIX):]
        out[ENV_ALIASES.get(name, name)] = _parse(value)
    return out


def secret_key(instance_path: Path) -> str:
    """Read the instance's secret key, generating it (mode 600) on first use."""
    path = instance_path / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    try:
        os.link(tmp, path)  # first writer wins if two processes race
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
