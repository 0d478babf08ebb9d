"""The web console end to end on the bed: a real guest with VNC on its server's loopback, the real
console proxy (SSH stream with Corral's pinned key), Chromium drawing noVNC and xterm.js, and every
token misuse refused by the proxy before a byte of the console is relayed. One guest for the module."""

from __future__ import annotations

import asyncio
import subprocess
import threading

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from portal import console_tokens
from portal.console_proxy import REFUSED, serve_forever
from portal.extensions import db, queues
from portal.models import Role, Server
from tests.bed.guest import appliance_domain_xml, serial_log_path
from tests.browser_util import log_in
from tests.conftest import PASSWORD, free_port, log_in_client, make_user, make_vm, register_bed_server
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


def test_console_vnc_serial_and_token_misuse(app, client, bed_servers, appliance_image, domain_type,
                                            proxy, live_server, browser):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True  # the page's fetch sends the CSRF header; so does this client
    bs = bed_servers[1]
    sid = register_bed_server(app, bs)
    with app.app_context():
        owner = make_user("ann", Role.REGULAR)
        other = make_user("bob", Role.REGULAR)
        make_vm(other, "con9b", server=db.session.get(Server, sid), state="running")
        vm = make_vm(owner, "con9", server=db.session.get(Server, sid), state="running")
        vm_id = vm.id
    disk = f"{bs.images_dir}/con9.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(appliance_image), "-F", "qcow2",
                    str(bs.host_path(disk))], check=True, capture_output=True)
    virsh = ["virsh", "-c", bs.uri_tcp]
    xml = appliance_domain_xml("con9", disk, domain_type=domain_type, bridge=None).replace(
        "</devices>", VNC + "</devices>")
    subprocess.run([*virsh, "create", "/dev/stdin"], input=xml, text=True, check=True, capture_output=True)
    try:
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
        non_blank = """() => { const c = document.querySelector('#console-screen canvas');
            if (!c || !c.width) return false;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 4; i < d.length; i += 4)
              if (d[i] !== d[0] || d[i+1] !== d[1] || d[i+2] !== d[2]) return true;
            return false; }"""
        page.wait_for_function(non_blank, timeout=60_000)

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
    finally:
        subprocess.run([*virsh, "destroy", "con9"], capture_output=True)
        bs.host_path(disk).unlink(missing_ok=True)
        bs.host_path(serial_log_path("con9")).unlink(missing_ok=True)
