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
import time
from pathlib import Path
from urllib.parse import urlparse

import click
import redis
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

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
    for cmd in (create_manager, worker, up, init, monitor, add_local_server, add_test_appliance):
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
    """Follow libvirt domain events on every up server and record them at once."""
    import logging

    from .monitor import Monitor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s monitor %(levelname)s %(message)s")
    mon = Monitor(current_app._get_current_object(), refresh_seconds=refresh)
    signal.signal(signal.SIGTERM, lambda *_: mon.stop.set())
    signal.signal(signal.SIGINT, lambda *_: mon.stop.set())
    mon.run()


@click.command("add-local-server")
@click.option("--disk", default="/var/lib/corral/disk1", show_default=True, help="VM disk directory to declare.")
@with_appcontext
def add_local_server(disk: str):
    """Register this machine as a VM server (local transport, qemu:///system)."""
    from . import local_server

    try:
        server = local_server.register(disk)
    except local_server.LocalServerError as exc:
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
    proc = subprocess.Popen(
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
    raise click.ClickException(f"redis-server did not come up on {host}:{port}.")


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
    upgrade()
    password = ensure_first_manager()

    children: list[tuple[str, subprocess.Popen]] = []
    url = app.config["REDIS_URL"]
    if not _redis_answers(url):
        click.echo(f"Starting a private redis-server for {url} (data in {instance / 'redis'}).")
        children.append(("redis-server", _start_redis(url, instance)))

    if not no_local_server:
        from . import local_server

        try:
            server = local_server.ensure_registered()
            if server is not None:
                click.echo(f"This machine is VM server {server.hostname} (guests run as {server.domain_type}).")
        except local_server.LocalServerError as exc:
            click.echo(f"Could not register this machine as a VM server: {exc}", err=True)

    from . import library

    try:
        if library.ensure_test_appliance() is not None:
            db.session.commit()
            click.echo(f"Added the test appliance {library.TEST_APPLIANCE} to the library.")
    except Exception as exc:  # the portal still runs without it
        db.session.rollback()
        click.echo(f"Could not add the test appliance: {exc}", err=True)

    env = dict(os.environ, CORRAL_INSTANCE_PATH=str(instance))
    children.append(("monitor", subprocess.Popen([sys.executable, "-m", "portal", "monitor"], env=env)))
    for i in range(workers):
        children.append((f"worker-{i + 1}", subprocess.Popen(
            [sys.executable, "-m", "portal", "worker", "--name", f"corral-{socket.gethostname()}-{os.getpid()}-{i + 1}"],
            env=env)))
    children.append(("web", subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", "2", "--threads", "4",
         "--access-logfile", "-", "--graceful-timeout", "5", "portal:create_app()"],
        env=env)))

    click.echo("")
    click.echo(f"  Corral is running at http://{bind}/   (Ctrl-C stops it)")
    if password:
        _print_login("admin", password)

    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    click.echo(f"{name} exited with status {proc.returncode}; stopping Corral.", err=True)
                    stopping = True
                    break
            time.sleep(0.5)
    finally:
        for _, proc in reversed(children):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(children):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    click.echo("Corral stopped.")
