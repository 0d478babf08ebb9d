"""The run command and the CLI, as a newcomer would use them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_corral_up_runs_everything_and_prints_the_first_login(tmp_path):
    redis_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_INSTANCE_PATH=str(tmp_path / "instance"),
               CORRAL_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    proc = subprocess.Popen([sys.executable, "-m", "portal", "up", "--bind", f"127.0.0.1:{web_port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        password = None
        deadline = time.monotonic() + 120
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            chunk = proc.stdout.readline()
            if chunk:
                lines.append(chunk)
                m = re.search(r"password: (\S+)", chunk)
                if m:
                    password = m.group(1)
            elif password and _port_open(web_port):
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{web_port}/login", timeout=5).status == 200:
                        break
                except OSError:
                    pass
            else:
                assert proc.poll() is None, "".join(lines)
                time.sleep(0.2)
        else:
            pytest.fail("corral up did not come up:\n" + "".join(lines))
        out = "".join(lines)
        assert "Starting a private redis-server" in out and "username: admin" in out
        assert "This machine is VM server" in out
        assert _port_open(redis_port)

        # The printed login works against the real web server.
        jar = CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = opener.open(f"http://127.0.0.1:{web_port}/login").read().decode()
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
        data = urllib.parse.urlencode({"username": "admin", "password": password, "csrf_token": token}).encode()
        summary = opener.open(f"http://127.0.0.1:{web_port}/login", data=data).read().decode()
        assert "Summary" in summary and "admin" in summary
        # The newcomer's first page already shows one working server.
        assert "1 up" in summary
        assert (tmp_path / "instance" / "secret_key").exists()
        assert (tmp_path / "instance" / "corral.sqlite").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "Corral stopped." in rest
    assert not _port_open(redis_port) and not _port_open(web_port)

    # A second start reuses the database and does not print a password again.
    proc = subprocess.run([sys.executable, "-m", "portal", "init"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "password:" not in proc.stdout


def _descendants(pid: int) -> dict[int, str]:
    """Every process below *pid* (from /proc), with its command line."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        todo.extend(children.get(child, []))
    return found


def _running(pid: int) -> bool:
    """True while *pid* exists and is not a zombie (a container's init may never reap it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_on_corral_up_stops_every_child_in_order_without_tracebacks(tmp_path):
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.

    Before, redis-server got that SIGINT too and quit under the RQ worker's
    warm shutdown, which then printed connection tracebacks.
    """
    redis_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_INSTANCE_PATH=str(tmp_path / "instance"),
               CORRAL_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", CORRAL_POLL_SECONDS="0")
    proc = subprocess.Popen([sys.executable, "-m", "portal", "up", "--no-local-server",
                             "--bind", f"127.0.0.1:{web_port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as in a terminal
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"http://127.0.0.1:{web_port}/login"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        kids = _descendants(proc.pid)
        for what in ("redis-server", "portal worker", "portal monitor", "gunicorn"):
            assert any(what in cmd for cmd in kids.values()), (what, kids)
        # The worker registered itself: it is in its loop and handles signals (warm shutdown).
        # The monitor runs the serial-console follower (it marks itself alive in Redis).
        while not (redis.Redis(port=redis_port).keys("rq:workers:*")
                   and redis.Redis(port=redis_port).exists("corral:console-follower")):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err and "Traceback" not in out, out + err
    assert "Corral stopped." in out
    assert not any(_running(pid) for pid in kids), {p: c for p, c in kids.items() if _running(p)}
    assert not _port_open(redis_port) and not _port_open(web_port)


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


def test_create_manager_prints_password_once_and_refuses_duplicates(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_INSTANCE_PATH"] = str(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "portal", *a], env=env, capture_output=True,
                                    text=True, timeout=60)
    assert run("db", "upgrade").returncode == 0
    first = run("create-manager", "chief", "--email", "chief@example.org")
    assert first.returncode == 0 and re.search(r"password: \S{12,}", first.stdout)
    again = run("create-manager", "chief")
    assert again.returncode != 0 and "exists already" in again.stderr
