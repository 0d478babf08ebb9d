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

import pytest

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
