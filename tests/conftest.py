"""Fixtures: a real redis-server, a fresh database per test, users, factories.

The database is built with the Alembic migrations (not ``create_all``) so the
tests exercise the schema users get. Each test gets its own SQLite file, a copy
of one migrated once per session (or, with ``CORRAL_TEST_DATABASE_URL`` set to a
PostgreSQL server, its own database, migrated for the test).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_lib
from flask.testing import FlaskClient
from itsdangerous import URLSafeTimedSerializer
from werkzeug.datastructures import Headers

from portal import create_app
from tests.bed.fixtures import appliance_image, appliance_iso, bed, bed_servers, domain_type  # noqa: F401
from portal.auth_core import hash_password
from portal.extensions import db
from portal.models import VM, NIC, Role, Server, ServerDisk, Task, User, VirtualDisk

PASSWORD = "correct horse battery"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its worker plugin registered later, so runs first)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the README's test command runs two workers, ``--dist loadgroup``): every
    test on the multi-server bed runs in one worker, one after the other (the bed is one set of
    network namespaces, built once per session); every other test runs in one worker with the rest
    of its module (module fixtures are made once; ``corral up``'s tests share a default port)."""
    for item in items:
        group = "bed" if "bed" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _bed_first(request):
    """Under two workers, a test off the bed runs at a lower CPU priority (its processes too: workers,
    web servers, Chromium inherit it), so the bed's guests, whose timings the bed tests measure, get
    the CPU first and the rest of the suite uses what they leave."""
    if "bed" in request.fixturenames or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, max(before, 10))
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, before)  # back up: root may; the next test may be the bed's
        except PermissionError:
            pass


def pytest_collection_finish(session):
    """The groups must reach xdist's scheduler (as a ``@group`` suffix of each node id); when a pytest or
    xdist upgrade breaks that, the bed tests would be spread over both workers, each waiting for the
    other's bed: say so instead."""
    if getattr(session.config.option, "loadgroup", False) and not all("@" in i.nodeid for i in session.items):
        raise pytest.UsageError("pytest-xdist did not apply the test groups (see pytest_collection_modifyitems "
                                "in tests/conftest.py); run with -n 0 or fix the pytest/xdist versions")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server on a free loopback port for the whole session."""
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis_lib.Redis.from_url(url)
    for _ in range(100):
        try:
            if client.ping():
                break
        except redis_lib.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


_db_counter = itertools.count()


def _test_database(name: str, request) -> str | None:
    """With CORRAL_TEST_DATABASE_URL (PostgreSQL), a fresh database per test."""
    base = os.environ.get("CORRAL_TEST_DATABASE_URL")
    if not base:
        return None
    import sqlalchemy as sa

    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    request.addfinalizer(drop)
    return sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> str:
    """An SQLite database migrated once with the Alembic migrations; each test starts from a copy."""
    from flask_migrate import upgrade

    root = tmp_path_factory.mktemp("migrated")
    path = root / "corral.sqlite"
    saved = {k: os.environ.get(k) for k in ("CORRAL_INSTANCE_PATH", "CORRAL_DATABASE_URL")}
    os.environ.update(CORRAL_INSTANCE_PATH=str(root / "instance"), CORRAL_DATABASE_URL=f"sqlite:///{path}")
    try:
        template = create_app({"TESTING": True})
        with template.app_context():
            upgrade()
            db.session.execute(db.text("PRAGMA wal_checkpoint(TRUNCATE)"))
            db.session.remove()
            db.engine.dispose()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return str(path)


@pytest.fixture
def app_env(tmp_path, redis_server, monkeypatch, request) -> dict[str, str]:
    """CORRAL_* settings for this test, also set in os.environ for subprocesses."""
    n = next(_db_counter)
    prefix = f"corraltest{os.getpid()}x{n}"
    database = _test_database(prefix, request)
    if database is None:
        shutil.copyfile(request.getfixturevalue("migrated_sqlite"), tmp_path / "corral.sqlite")
        database = f"sqlite:///{tmp_path / 'corral.sqlite'}"
    env = {
        "CORRAL_INSTANCE_PATH": str(tmp_path / "instance"),
        "CORRAL_SECRET_KEY": "test-secret",
        "CORRAL_REDIS_URL": redis_server,
        "CORRAL_QUEUE_PREFIX": prefix,
        "CORRAL_DATABASE_URL": database,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


class CsrfClient(FlaskClient):
    """A test client that, when the app says ``TEST_CLIENT_SENDS_CSRF``, sends the
    session's CSRF token with every unsafe request (as the pages' htmx header
    does). CSRF protection itself stays on: tests never switch it off."""

    def open(self, *args, **kwargs):
        method = str(kwargs.get("method", "GET")).upper()
        if self.application.config.get("TEST_CLIENT_SENDS_CSRF") and method not in ("GET", "HEAD", "OPTIONS"):
            headers = Headers(kwargs.get("headers") or {})
            if "X-CSRFToken" not in headers:
                headers["X-CSRFToken"] = self._csrf_token()
            kwargs["headers"] = headers
        return super().open(*args, **kwargs)

    def _csrf_token(self) -> str:
        # What flask_wtf.csrf.generate_csrf does: a raw token in the session, signed in the form.
        with self.session_transaction() as sess:
            raw = sess.setdefault("csrf_token", hashlib.sha1(os.urandom(64)).hexdigest())
        return URLSafeTimedSerializer(self.application.secret_key, salt="wtf-csrf-token").dumps(raw)


@pytest.fixture
def app(app_env, redis_server):
    """An application on a fresh, migrated database and a private Redis key prefix."""
    app = create_app({"TESTING": True})
    app.test_client_class = CsrfClient
    if not app_env["CORRAL_DATABASE_URL"].startswith("sqlite:"):  # SQLite: a copy of the migrated template
        with app.app_context():
            from flask_migrate import upgrade

            upgrade()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    r = redis_lib.Redis.from_url(redis_server)
    keys = list(r.scan_iter(f"*{app_env['CORRAL_QUEUE_PREFIX']}*"))
    if keys:
        r.delete(*keys)


def start_worker(*extra: str, log=subprocess.PIPE) -> subprocess.Popen:
    """A real ``corral worker`` process with this test's settings (from os.environ)."""
    return subprocess.Popen([sys.executable, "-m", "portal", "worker", *extra],
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_worker_burst(timeout: float = 120) -> str:
    """Run a worker until the queues are empty; return its output."""
    proc = start_worker("--burst")
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.fixture
def worker(app, tmp_path):
    """A long-running real worker process for the test's duration (log: tmp_path/worker.log)."""
    with open(tmp_path / "worker.log", "w") as log:
        proc = start_worker(log=log)
        yield proc
        stop_process(proc)


@pytest.fixture
def live_server(app):
    """The app served by a threaded WSGI server on a free loopback port."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield


_password_hashes: dict[str, str] = {}


def _hashed(password: str) -> str:
    """A real scrypt hash of *password*, made once per password per session (scrypt is slow on purpose)."""
    if password not in _password_hashes:
        _password_hashes[password] = hash_password(password)
    return _password_hashes[password]


def make_user(username: str, role: Role | str = Role.REGULAR, **kw) -> User:
    role = Role(role).value
    defaults = {"max_vms": 3, "max_memory_mb": 4096, "max_disk_gb": 50} if role == "power" else {}
    defaults.update(kw)
    user = User(username=username, role=role, password_hash=_hashed(kw.pop("password", PASSWORD)),
                **{k: v for k, v in defaults.items() if k != "password"})
    db.session.add(user)
    db.session.commit()
    return user


_server_counter = itertools.count(1)


def make_server(hostname: str | None = None, **kw) -> Server:
    n = next(_server_counter)
    server = Server(hostname=hostname or f"srv{n}", address=kw.pop("address", f"10.99.{n // 250}.{n % 250 + 1}"),
                    cpus=2, cores_per_cpu=4, memory_mb=65536, free_memory_mb=60000, **kw)
    db.session.add(server)
    db.session.flush()
    db.session.add(ServerDisk(server_id=server.id, mountpoint="/var/lib/corral/disk1", size_gb=1000, free_gb=800))
    db.session.commit()
    return server


_vm_counter = itertools.count(1)


def make_vm(owner: User, name: str | None = None, *, server: Server | None = None, memory_mb: int = 512,
            disk_gb: int = 10, state: str = "off", **kw) -> VM:
    n = next(_vm_counter)
    vm = VM(vmid=kw.pop("vmid", 1000 + n), name=name or f"vm{n}", owner_id=owner.id, memory_mb=memory_mb,
            vcpus=1, server_id=server.id if server else None, state=state, **kw)
    db.session.add(vm)
    db.session.flush()
    db.session.add(VirtualDisk(vm_id=vm.id, position=0, size_gb=disk_gb, bus="virtio", format="qcow2"))
    db.session.add(NIC(vm_id=vm.id, position=0, mac=f"52:54:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"))
    db.session.commit()
    return vm


def csrf_token(client, url: str) -> str:
    """The CSRF token a page at ``url`` hands its forms (CSRF stays on)."""
    html = client.get(url).get_data(as_text=True)
    m = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    assert m, f"no CSRF token on {url}"
    return m.group(1)


def log_in_client(client, username: str, password: str = PASSWORD):
    """Log a test client in through the form, CSRF token and all."""
    return client.post("/login", data={"username": username, "password": password,
                                       "csrf_token": csrf_token(client, "/login")})


def start_task(sub):
    """What a view does after ``tasks.submit``: commit once, then enqueue (returns ``sub``)."""
    from portal import tasks

    db.session.commit()
    tasks.enqueue(sub)
    return sub


def make_task(requester: User | None, *, title: str = "a task", target=None, state: str = "succeeded") -> Task:
    task = Task(kind="test", title=title, requester_id=requester.id if requester else None, state=state,
                target_type=type(target).__name__.lower() if target else None,
                target_id=target.id if target else None, log="")
    db.session.add(task)
    db.session.commit()
    return task


@pytest.fixture
def browser():
    """A headless Debian Chromium through Playwright (skips where it is not installed)."""
    from tests.browser_util import CHROMIUM, CHROMIUM_ARGS, DEFAULT_TIMEOUT_MS

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the browser tests drive it")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=DEFAULT_TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class AuthActions:
    def __init__(self, client):
        self._client = client

    def login(self, username: str, password: str = PASSWORD):
        return self._client.post("/login", data={"username": username, "password": password})

    def logout(self):
        return self._client.post("/logout")


@pytest.fixture
def manager(app, client):
    """The test client logged in as a manager ("boss"), sending CSRF tokens."""
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        make_user("boss", Role.MANAGER)
    client.post("/login", data={"username": "boss", "password": PASSWORD})
    return client


@pytest.fixture
def auth(client):
    return AuthActions(client)


def register_bed_server(app, bs, *, disks: tuple[str, ...] | None = None) -> int:
    """Register a bed server in Corral's database as the add flow would, without SSH work.

    Installs Corral's key in the server's own /root/.ssh/authorized_keys,
    pins its host key and declares its VM disk. Returns the server id.
    """
    from portal import servers
    from portal.models import ServerStatus

    with app.app_context():
        _, public = servers.corral_key()
        keys = bs.host_path("/root/.ssh/authorized_keys")
        keys.parent.mkdir(parents=True, exist_ok=True)
        existing = keys.read_text() if keys.exists() else ""
        if public not in existing:
            keys.write_text(existing + public + "\n")
        server = Server(hostname=bs.name, address=bs.address, ssh_port=bs.ssh_port, transport="ssh",
                        host_key=bs.host_key_public, host_key_fingerprint=bs.host_key_fingerprint,
                        status=ServerStatus.UP.value, cpus=1, cores_per_cpu=1, memory_mb=1024)
        db.session.add(server)
        db.session.flush()
        for mp in disks if disks is not None else (bs.disk_dir,):
            db.session.add(ServerDisk(server_id=server.id, mountpoint=mp, size_gb=10))
        db.session.commit()
        servers.write_known_hosts()
        return server.id


@pytest.fixture
def console_follower(app):
    """The serial-console follower that ``corral monitor`` runs, in this process (0.5 s ticks)."""
    from portal.consoles import ConsoleFollower

    follower = ConsoleFollower(app, tick=0.5).start()
    yield follower
    follower.close()


@pytest.fixture
def bed_portal(app, client, bed_servers, appliance_image):
    """The first two bed servers registered in Corral, the test appliance in its library and the
    client logged in as power user ``pow``: ``{"servers": [id, id], "disks": {server id: disk id},
    "appliance": id}``. Afterwards every ``t-*`` domain and Corral's folders go from both servers."""
    from portal import library

    app.config.update(TEST_CLIENT_SENDS_CSRF=True, APPLIANCE_CACHE=str(appliance_image.parent))
    sids = [register_bed_server(app, bs) for bs in bed_servers[:2]]
    with app.app_context():
        make_user("pow", Role.POWER, max_vms=5, max_memory_mb=2048, max_disk_gb=50)
        appliance_id = library.ensure_test_appliance().id
        db.session.commit()
        disks = {s: db.session.execute(db.select(ServerDisk.id).where(ServerDisk.server_id == s)).scalar_one()
                 for s in sids}
    log_in_client(client, "pow")
    yield {"servers": sids, "disks": disks, "appliance": appliance_id}
    for bs in bed_servers[:2]:
        names = subprocess.run(["virsh", "-c", bs.uri_tcp, "list", "--all", "--name"], capture_output=True,
                               text=True).stdout.split()
        for name in names:
            if name.startswith("t-"):
                subprocess.run(["virsh", "-c", bs.uri_tcp, "destroy", name], capture_output=True)
                subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", "--managed-save", name], capture_output=True)
        subprocess.run(["rm", "-rf", str(bs.host_path(f"{bs.disk_dir}/corral-vms")),
                        str(bs.host_path(f"{bs.disk_dir}/corral-bases"))])
