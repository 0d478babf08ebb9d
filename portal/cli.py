"""The ``corral`` command: Flask's CLI plus Corral's own commands.

``corral up`` runs the whole thing on one machine: migrates the database,
creates the first manager, starts a private redis-server if none answers,
a worker (with the RQ scheduler) and the web server on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import click
import redis
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from .config import Defaults
from .extensions import db, queues


def _create_app(*_args, **_kwargs) -> Flask:
    from . import create_app

    return create_app()


@click.group(cls=FlaskGroup, create_app=_create_app, add_version_option=False)
def cli():
    """Corral: a self-service VM orchestrator."""


def main() -> None:
    cli(prog_name="corral")


def init_app(app: Flask) -> None:
    """Flask's own ``flask --app portal ...`` sees the same commands."""
    for cmd in (create_manager, worker, up, init, monitor, console_proxy, add_local_server, add_test_appliance):
        if cmd.name not in app.cli.commands:
            app.cli.add_command(cmd)


def ensure_first_manager(username: str = "admin") -> str | None:
    """Create a manager when there is none; return its one-time password."""
    from . import users
    from .models import Role, User

    exists = db.session.execute(db.select(User.id).where(User.role == Role.MANAGER.value)).first()
    if exists:
        return None
    password = users.generate_password()
    users.create_user(username=username, role=Role.MANAGER.value, email=None, password=password)
    db.session.commit()
    return password


def _print_login(username: str, password: str) -> None:
    click.echo("")
    click.echo("  First manager account (the password is shown only now; change it under Account):")
    click.echo(f"    username: {username}")
    click.echo(f"    password: {password}")
    click.echo("")


@click.command("create-manager")
@click.argument("username", default="admin")
@click.option("--email", default=None)
@with_appcontext
def create_manager(username: str, email: str | None):
    """Create a manager account and print its generated password once."""
    from . import users
    from .models import Role

    password = users.generate_password()
    try:
        users.create_user(username=username, role=Role.MANAGER.value, email=email, password=password)
    except users.UserError as exc:
        raise click.ClickException(str(exc)) from exc
    db.session.commit()
    _print_login(username, password)


@click.command("init")
@with_appcontext
def init():
    """Create or upgrade the database schema and the first manager."""
    from flask_migrate import upgrade

    upgrade()
    password = ensure_first_manager()
    if password:
        _print_login("admin", password)


@click.command("worker")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
@click.option("--name", default=None, help="Worker name (default: host and pid).")
@with_appcontext
def worker(burst: bool, name: str | None):
    """Run an RQ worker (with the scheduler) on Corral's queues."""
    from rq import Worker

    from .jobs import set_app
    from .jobs.monitoring import ensure_poll_scheduled

    app = current_app._get_current_object()
    set_app(app)
    if not burst and app.config["POLL_SECONDS"]:
        ensure_poll_scheduled()
    db.engine.dispose()
    w = Worker(queues.all_names(), connection=queues.redis, name=name)
    w.work(burst=burst, with_scheduler=True, logging_level="INFO")


@click.command("monitor")
@click.option("--refresh", default=5.0, show_default=True, help="Seconds between subscription refreshes.")
@with_appcontext
def monitor(refresh: float):
    """Follow libvirt domain events on every up server and record them at once;
    follow the serial console of every running VM for the VM pages."""
    import logging

    from .consoles import ConsoleFollower
    from .monitor import Monitor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s monitor %(levelname)s %(message)s")
    app = current_app._get_current_object()
    mon = Monitor(app, refresh_seconds=refresh)
    signal.signal(signal.SIGTERM, lambda *_: mon.stop.set())
    signal.signal(signal.SIGINT, lambda *_: mon.stop.set())
    follower = ConsoleFollower(app).start()
    try:
        mon.run()
    finally:
        follower.close()


@click.command("console-proxy")
@click.option("--bind", default=None, help="host:port (default: CONSOLE_PROXY_BIND).")
@with_appcontext
def console_proxy(bind: str | None):
    """Relay the web console's WebSockets to the guests' VNC ports and serial ptys (see README, Console)."""
    import asyncio
    import logging

    from .console_proxy import serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s console-proxy %(levelname)s %(message)s")
    host, _, port = (bind or current_app.config["CONSOLE_PROXY_BIND"]).rpartition(":")
    app = current_app._get_current_object()

    async def main():
        task = asyncio.create_task(serve_forever(app, host or "127.0.0.1", int(port)))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())


@click.command("add-local-server")
@click.option("--disk", default="/var/lib/corral/disk1", show_default=True, help="VM disk directory to declare.")
@with_appcontext
def add_local_server(disk: str):
    """Register this machine as a VM server (local transport, qemu:///system)."""
    from . import local_server

    try:
        server = local_server.register(disk)
        db.session.commit()
    except local_server.LocalServerError as exc:
        db.session.rollback()
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Registered {server.hostname} (guests run as {server.domain_type}).")


@click.command("add-test-appliance")
@with_appcontext
def add_test_appliance():
    """Build the small test appliance (or reuse the cached build) and add it to the library."""
    from . import library

    row = library.ensure_test_appliance()
    db.session.commit()
    click.echo(f"Added appliance {row.name}." if row else f"The library has {library.TEST_APPLIANCE} already.")


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """A child in its own process group: a terminal's Ctrl-C (SIGINT to the whole
    foreground group) reaches only ``corral up``, which then stops the children
    in order instead of all of them at once."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, process_group=0, **kwargs)


def _start_redis(url: str, instance: Path) -> subprocess.Popen:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise click.ClickException(f"Redis at {url} does not answer, and Corral only starts a local one.")
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(exe).exists():
        raise click.ClickException("redis-server is not installed (apt-get install redis-server).")
    data = instance / "redis"
    data.mkdir(exist_ok=True)
    proc = _spawn(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data), "--save", "60 1",
         "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no", "--logfile", ""],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        if _redis_answers(url):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise click.ClickException(f"redis-server did not come up on {host}:{port}.")


# Dependants first: the web server and the monitor enqueue into Redis, and the
# worker's warm shutdown (finish the current job, deregister) still needs it.
STOP_ORDER = ("web", "console-proxy", "monitor", "worker", "redis")
STOP_SECONDS = {"web": 10.0, "console-proxy": 10.0, "monitor": 10.0, "worker": 30.0, "redis": 30.0}
COLD_STOP_SECONDS = 10.0  # after a worker's second SIGTERM (RQ's cold shutdown ends the running job)


class _Supervisor:
    """The processes ``corral up`` started, and the signals that end them.

    The first SIGINT/SIGTERM asks for an orderly stop; a second one while
    stopping skips the remaining waits and kills what is left.
    """

    def __init__(self) -> None:
        self.children: list[tuple[str, str, subprocess.Popen]] = []  # (kind, name, process)
        self.stop_requested = threading.Event()
        self.hurry = threading.Event()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, *_) -> None:
        (self.hurry if self.stop_requested.is_set() else self.stop_requested).set()

    def add(self, kind: str, name: str, proc: subprocess.Popen) -> None:
        self.children.append((kind, name, proc))

    def watch(self) -> str | None:
        """Wait for a stop request (None) or for a child to exit on its own (its name)."""
        while not self.stop_requested.wait(0.5):
            for _, name, proc in self.children:
                if proc.poll() is not None:
                    click.echo(f"{name} exited with status {proc.returncode}; stopping Corral.", err=True)
                    return name
        return None

    def stop_all(self) -> None:
        for kind in STOP_ORDER:
            procs = [(name, proc) for k, name, proc in self.children if k == kind]
            self._stop(kind, procs)
        self.children.clear()

    def _stop(self, kind: str, procs: list[tuple[str, subprocess.Popen]]) -> None:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_SECONDS[kind]
        for name, proc in procs:
            if self._wait(proc, deadline):
                continue
            if kind == "worker":
                click.echo(f"{name} is still finishing a job; ending it (cold shutdown).", err=True)
                proc.terminate()
                if self._wait(proc, time.monotonic() + COLD_STOP_SECONDS):
                    continue
            click.echo(f"{name} did not stop; killing it.", err=True)
            proc.kill()
            proc.wait()

    def _wait(self, proc: subprocess.Popen, deadline: float) -> bool:
        """Whether *proc* ended before *deadline* (or before a second Ctrl-C)."""
        while time.monotonic() < deadline and not self.hurry.is_set():
            try:
                proc.wait(timeout=0.2)
                return True
            except subprocess.TimeoutExpired:
                pass
        return proc.poll() is not None


@click.command("up")
@click.option("--bind", default=None, help="Address:port of the web server (default 127.0.0.1:5000).")
@click.option("--workers", default=1, show_default=True, help="RQ worker processes.")
@click.option("--no-local-server", is_flag=True, help="Do not register this machine as a VM server.")
@with_appcontext
def up(bind: str | None, workers: int, no_local_server: bool):
    """Run Corral on this machine: database, Redis, worker(s) and web server."""
    from flask_migrate import upgrade

    app = current_app._get_current_object()
    instance = Path(app.instance_path)
    bind = bind or app.config["BIND"]
    supervisor = _Supervisor()
    supervisor.install_signal_handlers()
    # Whatever ends this command (a stop, an error while starting), the children go in order.
    click.get_current_context().call_on_close(supervisor.stop_all)
    upgrade()
    password = ensure_first_manager()

    url = app.config["REDIS_URL"]
    if not _redis_answers(url):
        click.echo(f"Starting a private redis-server for {url} (data in {instance / 'redis'}).")
        supervisor.add("redis", "redis-server", _start_redis(url, instance))

    if not no_local_server:
        from . import local_server

        try:
            server = local_server.ensure_registered()
            db.session.commit()
            if server is not None:
                click.echo(f"This machine is VM server {server.hostname} (guests run as {server.domain_type}).")
        except local_server.LocalServerError as exc:
            db.session.rollback()
            click.echo(f"Could not register this machine as a VM server: {exc}", err=True)

    from . import library

    try:
        if library.ensure_test_appliance() is not None:
            db.session.commit()
            click.echo(f"Added the test appliance {library.TEST_APPLIANCE} to the library.")
    except Exception as exc:  # the portal still runs without it
        db.session.rollback()
        click.echo(f"Could not add the test appliance: {exc}", err=True)

    if not supervisor.stop_requested.is_set():  # no Ctrl-C while preparing
        _start_services(supervisor, instance, bind, workers)
        click.echo("")
        click.echo(f"  Corral is running at http://{bind}/   (Ctrl-C stops it)")
        if password:
            _print_login("admin", password)

    crashed = supervisor.watch()
    click.echo("Stopping Corral (Ctrl-C again to kill what is left)." if crashed is None else "Stopping Corral.")
    supervisor.stop_all()
    click.echo("Corral stopped.")
    if crashed is not None:
        click.get_current_context().exit(1)


def _start_services(supervisor: _Supervisor, instance: Path, bind: str, workers: int) -> None:
    """The monitor, the worker(s) and the web server, with this instance's settings."""
    env = dict(os.environ, CORRAL_INSTANCE_PATH=str(instance))
    supervisor.add("monitor", "monitor", _spawn([sys.executable, "-m", "portal", "monitor"], env=env))
    web_env = dict(env)
    proxy_env = dict(env)
    if not current_app.config.get("CONSOLE_WS_URL"):
        # No reverse proxy in front: the pages open the console proxy's own port on the host the
        # browser reached the portal by, so the proxy listens where the web server does.
        web_host = bind.rpartition(":")[0] or "127.0.0.1"
        proxy_bind = current_app.config["CONSOLE_PROXY_BIND"]
        if proxy_bind == Defaults.CONSOLE_PROXY_BIND and web_host not in ("127.0.0.1", "localhost"):
            proxy_bind = f"{web_host}:{proxy_bind.rpartition(':')[2]}"
            proxy_env["CORRAL_CONSOLE_PROXY_BIND"] = proxy_bind
        web_env["CORRAL_CONSOLE_WS_PORT"] = proxy_bind.rpartition(":")[2]
    supervisor.add("console-proxy", "console-proxy",
                   _spawn([sys.executable, "-m", "portal", "console-proxy"], env=proxy_env))
    for i in range(workers):
        supervisor.add("worker", f"worker-{i + 1}", _spawn(
            [sys.executable, "-m", "portal", "worker", "--name", f"corral-{socket.gethostname()}-{os.getpid()}-{i + 1}"],
            env=env))
    supervisor.add("web", "web", _spawn(
        [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", "2", "--threads", "4",
         "--access-logfile", "-", "--graceful-timeout", "5", "portal:create_app()"],
        env=web_env))
