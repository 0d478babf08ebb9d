"""The web console end to end on the bed: a real guest with VNC on its server's loopback, the real
console proxy (SSH stream with Corral's pinned key), Chromium drawing noVNC and xterm.js, and every
token misuse refused by the proxy before a byte of the console is relayed. One guest for the module."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from portal import console_tokens
from portal.console_proxy import REFUSED, serve_forever
from portal.extensions import db, queues
from portal.models import Role, Server
from tests.bed.guest import appliance_domain_xml, serial_log_path
from tests.browser_util import log_in
from tests.conftest import (PASSWORD, free_port, log_in_client, make_user, make_vm, register_bed_server,
                            stop_process)
from tests.vm_util import wait_for

pytestmark = [pytest.mark.bed, pytest.mark.browser, pytest.mark.slow]

VNC = "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>"


@pytest.fixture
def proxy(app):
    """``corral console-proxy``'s server on a free loopback port, in a thread of this process."""
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = asyncio.Event()

    async def run():
        try:
            await serve_forever(app, "127.0.0.1", port, ready)
        except asyncio.CancelledError:
            pass  # the fixture's end, as Ctrl-C ends corral console-proxy

    task = loop.create_task(run())
    thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
    thread.start()
    wait_for(ready.is_set, 10, "the proxy to listen")
    app.config["CONSOLE_WS_URL"] = f"ws://127.0.0.1:{port}/console/ws"
    yield f"ws://127.0.0.1:{port}/console/ws"
    loop.call_soon_threadsafe(task.cancel)
    thread.join(timeout=10)
    loop.close()


def _session_cookie(client, app) -> str:
    cookie = client.get_cookie(app.config["SESSION_COOKIE_NAME"])
    return f"{cookie.key}={cookie.value}"


def _refused(url: str, cookie: str) -> bool:
    """The proxy closes with 1008 and relays nothing (no RFB banner, no serial byte)."""
    with ws_connect(url, additional_headers={"Cookie": cookie}, open_timeout=10) as ws:
        try:
            data = ws.recv(timeout=20)
        except ConnectionClosed as exc:
            return exc.rcvd is not None and exc.rcvd.code == REFUSED
        pytest.fail(f"the proxy relayed {data!r}")


@pytest.fixture(scope="module")
def guest(bed_servers, appliance_image, domain_type):
    """The guest ``con9`` with VNC graphics, running on the second bed server for the module."""
    bs = bed_servers[1]
    disk = f"{bs.images_dir}/con9.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(appliance_image), "-F", "qcow2",
                    str(bs.host_path(disk))], check=True, capture_output=True)
    virsh = ["virsh", "-c", bs.uri_tcp]
    xml = appliance_domain_xml("con9", disk, domain_type=domain_type, bridge=None).replace(
        "</devices>", VNC + "</devices>")
    subprocess.run([*virsh, "create", "/dev/stdin"], input=xml, text=True, check=True, capture_output=True)
    yield bs
    subprocess.run([*virsh, "destroy", "con9"], capture_output=True)
    bs.host_path(disk).unlink(missing_ok=True)
    bs.host_path(serial_log_path("con9")).unlink(missing_ok=True)


def _vm_rows(app, bs) -> int:
    """The guest's server and VM rows (ann owns con9; bob owns another VM); con9's id."""
    sid = register_bed_server(app, bs)
    with app.app_context():
        owner = make_user("ann", Role.REGULAR)
        other = make_user("bob", Role.REGULAR)
        make_vm(other, "con9b", server=db.session.get(Server, sid), state="running")
        return make_vm(owner, "con9", server=db.session.get(Server, sid), state="running").id


NON_BLANK = """() => { const c = document.querySelector('#console-screen canvas');
    if (!c || !c.width) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 4; i < d.length; i += 4)
      if (d[i] !== d[0] || d[i+1] !== d[1] || d[i+2] !== d[2]) return true;
    return false; }"""


def test_console_vnc_serial_and_token_misuse(app, client, guest, proxy, live_server, browser):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True  # the page's fetch sends the CSRF header; so does this client
    # As `corral up` runs it: the page opens the proxy's port on the host it was served from.
    app.config.update(CONSOLE_WS_URL=None, CONSOLE_WS_PORT=int(proxy.rsplit(":", 1)[1].split("/", 1)[0]))
    bs = guest
    vm_id = _vm_rows(app, bs)
    virsh = ["virsh", "-c", bs.uri_tcp]
    # VNC listens on the server's loopback only.
    display = subprocess.run([*virsh, "domdisplay", "con9"], capture_output=True, text=True, check=True).stdout
    assert display.startswith("vnc://127.0.0.1:"), display

    # Token misuse, refused by the proxy: made-up, another user's, replayed, expired.
    log_in_client(client, "ann")
    cookie = _session_cookie(client, app)
    bob = app.test_client()
    log_in_client(bob, "bob")
    bob_cookie = _session_cookie(bob, app)
    assert _refused(f"{proxy}/vnc?token=made-up", cookie)
    token = client.post(f"/vms/{vm_id}/console/vnc/token").get_json()["token"]
    assert _refused(f"{proxy}/vnc?token={token}", bob_cookie)  # foreign (and now spent)
    assert _refused(f"{proxy}/vnc?token={token}", cookie)  # replayed
    token = client.post(f"/vms/{vm_id}/console/vnc/token").get_json()["token"]
    with app.app_context():
        key = console_tokens._key(token)
        queues.redis.pexpire(key, 1)
        wait_for(lambda: not queues.redis.exists(key), 5, "the token to expire")
    assert _refused(f"{proxy}/vnc?token={token}", cookie)  # expired
    assert bob.post(f"/vms/{vm_id}/console/vnc/token").status_code == 404  # not bob's VM
    # A good token relays the VM's RFB banner.
    token = client.post(f"/vms/{vm_id}/console/vnc/token").get_json()["token"]
    with ws_connect(f"{proxy}/vnc?token={token}", additional_headers={"Cookie": cookie}) as ws:
        assert ws.recv(timeout=20).startswith(b"RFB 003.")

    # The browser: noVNC draws the guest's screen (pixels that are not all one colour).
    context = browser.new_context(base_url=live_server)
    page = context.new_page()
    log_in(page, "ann", PASSWORD)
    page.goto(f"/vms/{vm_id}")
    page.get_by_test_id("vm-console").first.click()
    page.wait_for_selector("[data-testid=console-status][data-state=connected]")
    page.wait_for_function(NON_BLANK, timeout=60_000)

    # The serial terminal: the guest's heartbeat arrives, and a command typed into the guest's
    # serial shell runs there (its output, not just the echo, comes back). The terminal's whole
    # scrollback is read: heartbeats scroll the screen 10 lines a second.
    page.goto(f"/vms/{vm_id}/console/serial")
    page.wait_for_selector("[data-testid=console-status][data-state=connected]")
    scrollback = """(needle) => { const t = document.getElementById('console-screen').terminal;
        if (!t) return false;
        const b = t.buffer.active;
        for (let i = 0; i < b.length; i++) {
          const line = b.getLine(i);
          if (line && line.translateToString(true).includes(needle)) return true;
        }
        return false; }"""
    page.wait_for_function(scrollback, arg="CORRAL-HB", timeout=30_000)
    page.locator("#console-screen").click()
    page.keyboard.type("echo corral$((6*7))")
    page.keyboard.press("Enter")
    page.wait_for_function(scrollback, arg="corral42", timeout=30_000)
    context.close()


NGINX_CONF = """
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        # The README's snippet: the console's WebSocket path to corral console-proxy ...
        location /corral/console/ws/ {{
            proxy_pass http://127.0.0.1:{ws_port}/console/ws/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
        }}
        # ... and the portal (gunicorn) on the same sub-path.
        location /corral/ {{
            proxy_pass http://127.0.0.1:{web_port}/;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Prefix /corral;
        }}
    }}
}}
"""


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def nginx_sub_path(app, proxy, tmp_path):
    """Debian's nginx on a loopback port serving gunicorn (the portal, this test's settings) and the
    console proxy under ``/corral/``, as the README's snippet does; yields nginx's base URL."""
    web_port, port = free_port(), free_port()
    ws_port = int(proxy.rsplit(":", 1)[1].split("/", 1)[0])
    env = {**os.environ, "CORRAL_PROXY_FIX_X_FOR": "1", "CORRAL_PROXY_FIX_X_PROTO": "1",
           "CORRAL_PROXY_FIX_X_HOST": "1", "CORRAL_PROXY_FIX_X_PREFIX": "1"}
    env.pop("CORRAL_CONSOLE_WS_URL", None)  # the page uses its own origin and prefix
    root = Path(__file__).resolve().parents[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port, ws_port=ws_port, web_port=web_port))
    with open(tmp_path / "gunicorn.log", "w") as web_log, open(tmp_path / "nginx.out", "w") as nginx_log:
        web = subprocess.Popen([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{web_port}", "-w", "1",
                                "--threads", "4", "wsgi:app"], cwd=root, env=env,
                               stdout=web_log, stderr=subprocess.STDOUT)
        nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf)],
                                 stdout=nginx_log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _listening(web_port) and _listening(port), 30, "gunicorn and nginx to listen")
            yield f"http://127.0.0.1:{port}"
        finally:
            for proc in (nginx, web):
                stop_process(proc)


def test_console_behind_nginx_on_a_sub_path(app, guest, nginx_sub_path, browser, tmp_path):
    vm_id = _vm_rows(app, guest)
    context = browser.new_context(base_url=nginx_sub_path)
    page = context.new_page()
    log_in(page, "ann", PASSWORD, prefix="/corral")
    assert page.url.startswith(f"{nginx_sub_path}/corral/")  # the redirect kept the prefix
    page.goto(f"/corral/vms/{vm_id}")
    assert page.get_by_test_id("vm-console").first.get_attribute("href").startswith("/corral/vms/")
    page.get_by_test_id("vm-console").first.click()
    page.wait_for_selector("[data-testid=console-status][data-state=connected]")
    page.wait_for_function(NON_BLANK, timeout=60_000)
    # The WebSocket went through nginx on the sub-path: its access log names the upgrade (101),
    # written when the connection ends.
    context.close()
    upgraded = re.compile(r'"GET /corral/console/ws/vnc\?token=\S+ HTTP/1.1" 101 ')
    wait_for(lambda: upgraded.search((tmp_path / "access.log").read_text()), 20, "nginx to log the WebSocket")
