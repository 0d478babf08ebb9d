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

    # Web console: seconds a console token minted by the portal stays redeemable (once).
    CONSOLE_TOKEN_SECONDS = 30
    # corral console-proxy: its loopback address (a reverse proxy routes /console/ws/ there), how often an
    # open console re-checks the VM runs and the user may still use it, and the WebSocket URL the pages use
    # (None: the portal's own origin and path prefix, ws or wss like the page).
    CONSOLE_PROXY_BIND = "127.0.0.1:6080"
    CONSOLE_RECHECK_SECONDS = 2.0
    CONSOLE_WS_URL: str | None = None
    # Without a reverse proxy: the console proxy's port on the host the browser reached the portal by
    # (ws://<that host>:<port>/console/ws/...); `corral up` sets it. 0: use CONSOLE_WS_URL or the origin.
    CONSOLE_WS_PORT = 0

    # Pages
    PAGE_SIZE = 50
    SUMMARY_REFRESH_SECONDS = 5

    # JSON API (/api/v1): requests per token (or cookie session) per minute; 0: unlimited.
    API_RATE_LIMIT = 600
    API_MAX_WAIT_SECONDS = 30  # the longest GET /api/v1/tasks/<id>?wait=N holds a web thread
    # /metrics: a bearer secret Prometheus sends, and/or client addresses allowed without it.
    METRICS_TOKEN: str | None = None
    METRICS_ALLOW = "127.0.0.1,::1"

    # Metering: the currency price sheets and invoices are in (a label; amounts are exact to the cent).
    METERING_CURRENCY = "EUR"

    # Rebalancing (portal.rebalance): a server is over when its load per core or its used memory
    # (averaged over the window) passes these; the automatic mode migrates VMs off a server that
    # stays over for AUTO_AFTER seconds, at most MAX_MOVES migrations at once, never during a failover.
    REBALANCE_CPU_THRESHOLD = 0.8
    REBALANCE_MEMORY_THRESHOLD = 0.85
    REBALANCE_WINDOW_SECONDS = 600
    REBALANCE_AUTO = False
    REBALANCE_AUTO_AFTER_SECONDS = 900
    REBALANCE_MAX_MOVES = 2

    # LiveSync failover (portal/ha.py, the agent portal/vmm/agent.py on each VM server). The monitor
    # renews each server's lease every HA_LEASE_INTERVAL_SECONDS; an agent that hears neither Corral nor
    # a peer for HA_FENCE_AFTER_SECONDS destroys its protected VMs; the backup starts a VM only once the
    # primary was silent for HA_TAKEOVER_SECONDS (must exceed HA_FENCE_AFTER_SECONDS by >= 1 s).
    # Agents listen on HA_AGENT_PORT of the servers' own addresses only.
    HA_LEASE_INTERVAL_SECONDS = 0.5
    HA_FENCE_AFTER_SECONDS = 3.0
    HA_TAKEOVER_SECONDS = 5.0
    HA_AGENT_PORT = 10780

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
    # Reverse proxies in front of Corral that may be trusted (werkzeug's ProxyFix):
    # how many X-Forwarded-For / -Proto / -Host values to believe. 0 (default)
    # ignores those headers, which is right when clients reach Corral directly;
    # behind one proxy set PROXY_FIX_X_FOR = 1, or every client shares the
    # proxy's address in the login throttle and the action log.
    PROXY_FIX_X_FOR = 0
    PROXY_FIX_X_PROTO = 0
    PROXY_FIX_X_HOST = 0
    # Behind a proxy that serves Corral on a sub-path (location /corral/ ...) and sends
    # X-Forwarded-Prefix: set to 1 so links, redirects and the console's WebSocket path carry it.
    PROXY_FIX_X_PREFIX = 0

    # The network preselected for a new VM's first NIC (a network's name; empty: outbound only, user-mode)
    DEFAULT_NETWORK = ""
    # The VLAN ids a new virtual cluster's private network takes the next free one from
    CLUSTER_VLAN_FIRST = 2
    CLUSTER_VLAN_LAST = 4094

    # Default quotas for new power users
    DEFAULT_MAX_VMS = 5
    DEFAULT_MAX_MEMORY_MB = 8192
    DEFAULT_MAX_DISK_GB = 200

    # Monitoring
    POLL_SECONDS = 30  # how often every server is polled
    POLL_THREADS = 16  # servers probed at once
    SERVER_DOWN_GRACE_SECONDS = 60  # silence before a server counts as down
    # Health thresholds: MEM_FREE_WARNING/_CRITICAL (% free memory), DISK_FREE_WARNING/_CRITICAL,
    # LOAD_WARNING/_CRITICAL (1-minute load per CPU). Unset: portal.vmm.health.Thresholds' defaults,
    # the same ones check_vmm_host uses (see portal.monitoring.THRESHOLD_SETTINGS).
    # Files every worker must reach: uploads, the library's disks and ISOs, the
    # catalog's state and exports. It must be the same path on every worker
    # machine (e.g. an NFS mount). None: <instance>/shared.
    SHARED_PATH: str | None = None
    # Where the test appliance is built and cached (None: /var/cache/corral-appliance)
    APPLIANCE_CACHE: str | None = None
    # The published appliance catalog (a JSON index); managers can change it on the Library page
    CATALOG_URL = ""
    # hostname -> libvirt URI, to reach a server's libvirtd another way than qemu+ssh
    LIBVIRT_URI_OVERRIDES: dict = {}

    # Live migration, cluster-wide (the Migrate form may change them per migration; read in
    # portal.moves.default_options): bandwidth cap in MiB/s (0: none), the longest pause of the
    # guest QEMU may take for the switch-over, auto-converge (slow a guest that dirties memory
    # faster than it is copied), and the time after which a migration is aborted (never forced).
    MIGRATION_BANDWIDTH_MIBS = 0
    MIGRATION_MAX_DOWNTIME_MS = 300  # QEMU's default
    MIGRATION_AUTO_CONVERGE = True
    MIGRATION_TIME_LIMIT_SECONDS = 600
    # Where backups of VMs without a LiveSync backup server go ("host:/mountpoint" of a registered VM
    # disk); empty: on the VM's own server disk.
    BACKUP_STORE = ""

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
