"""How fast the web console answers, next to a direct connection on the VM's server.

    flock /tmp/corral-bed.lock .venv/bin/python bench/console.py [--rounds 20]

A guest made and started by Corral (its own domain XML: VNC on the server's loopback, serial pty)
on test-bed server 1; the portal (threaded WSGI server) and ``corral console-proxy`` on loopback
ports of this machine; Debian's Chromium through Playwright. Median of ``--rounds``:

- **first frame**: clicking *Console* on the VM page to the first canvas pixels that are not all
  one colour (navigation start to the first animation frame that sees them: page load, token,
  WebSocket, the proxy's SSH stream to the server, RFB handshake, noVNC's first draw). In between,
  the proxy without a browser: token, WebSocket, RFB handshake to the end of the first full
  framebuffer update. Raw: the same RFB exchange straight to the VNC port, run on the server.
- **keystroke round trip**: a character typed into the serial terminal (xterm.js input) to its
  echo arriving back at the terminal (the guest's tty echoes it). Raw: a character written to the
  same pty on the server to its echo read back there.

It uses the test bed (``python -m tests.bed up``) and a throw-away instance; a benchmark prints
measurements, it is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.migrate import _boot, _last_task_id, _line, _wait_task  # noqa: E402
from bench.provision import _redis, bench_instance  # noqa: E402
from portal.extensions import db  # noqa: E402
from portal.models import VM  # noqa: E402

NAME = "bm-con"
PASSWORD = "bench-console-pw"

# Run on the VM's server: the RFB handshake to the end of the first full update (raw encoding, as
# no SetEncodings is sent), and a character written to the serial pty until its echo comes back.
RAW_SCRIPT = r"""
import json, os, socket, struct, sys, termios, time, tty
port, pty, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b

def first_frame():
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    exact(s, 12); s.sendall(b"RFB 003.008\n")
    n = exact(s, 1)[0]; exact(s, n); s.sendall(b"\x01"); exact(s, 4)
    s.sendall(b"\x01")
    w, h = struct.unpack(">HH", exact(s, 4)); bpp = exact(s, 16)[0]
    exact(s, struct.unpack(">I", exact(s, 4))[0])
    s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
    while True:
        kind = exact(s, 1)[0]
        if kind == 0: break
    exact(s, 1); rects = struct.unpack(">H", exact(s, 2))[0]
    for _ in range(rects):
        x, y, rw, rh, enc = struct.unpack(">HHHHi", exact(s, 12))
        if enc == 0: exact(s, rw * rh * bpp // 8)
    s.close()
    return time.perf_counter() - t0

def keystrokes():
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd); attrs[3] &= ~termios.ECHO; termios.tcsetattr(fd, termios.TCSANOW, attrs)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        os.write(fd, b"x")
        while b"x" not in os.read(fd, 4096): pass
        out.append(time.perf_counter() - t0)
    os.write(fd, b"\x15")
    os.close(fd)
    return out

print(json.dumps({"frame": [first_frame() for _ in range(rounds)], "key": keystrokes()}))
"""

FIRST_FRAME_PROBE = """(() => {
  const look = () => {
    const c = document.querySelector('#console-screen canvas');
    if (c && c.width) {
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (let i = 4; i < d.length; i += 4)
        if (d[i] !== d[0] || d[i+1] !== d[1] || d[i+2] !== d[2]) { window.__firstFrame = performance.now(); return; }
    }
    requestAnimationFrame(look);
  };
  if (location.pathname.endsWith('/console/vnc')) requestAnimationFrame(look);
})();"""

KEYSTROKES = """async (rounds) => {
  const t = document.getElementById('console-screen').terminal;
  const out = [];
  const write = t.write.bind(t);
  let waiting = null;
  t.write = (data, cb) => {
    const text = typeof data === 'string' ? data : new TextDecoder().decode(data);
    if (waiting && text.includes('x')) { const w = waiting; waiting = null; w(); }
    return write(data, cb);
  };
  for (let i = 0; i < rounds; i++) {
    const t0 = performance.now();
    await new Promise((resolve) => { waiting = resolve; t.input('x', true); });
    out.push((performance.now() - t0) / 1000);
  }
  t.input('\\x15', true);
  t.write = write;
  return out;
}"""


def _proxy_frames(app, client, proxy: str, vm_id: int, cookie: str, rounds: int) -> list[float]:
    """Token, WebSocket through the proxy, RFB handshake to the end of the first full update."""
    import struct

    from websockets.sync.client import connect

    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        token = client.post(f"/vms/{vm_id}/console/vnc/token").get_json()["token"]
        with connect(f"{proxy}/vnc?token={token}", additional_headers={"Cookie": cookie},
                     max_size=None) as ws:
            buf = bytearray()

            def exact(n: int) -> bytes:
                while len(buf) < n:
                    buf.extend(ws.recv(timeout=30))
                data = bytes(buf[:n])
                del buf[:n]
                return data

            exact(12)
            ws.send(b"RFB 003.008\n")
            exact(exact(1)[0])
            ws.send(b"\x01")
            exact(4)
            ws.send(b"\x01")
            w, h = struct.unpack(">HH", exact(4))
            bpp = exact(16)[0]
            exact(struct.unpack(">I", exact(4))[0])
            ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
            while exact(1)[0] != 0:
                pass
            exact(1)
            for _ in range(struct.unpack(">H", exact(2))[0]):
                _x, _y, rw, rh, enc = struct.unpack(">HHHHi", exact(12))
                if enc == 0:
                    exact(rw * rh * bpp // 8)
        out.append(time.perf_counter() - t0)
    return out


def _serve(app) -> tuple[str, object]:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def _proxy(app) -> str:
    import socket

    from portal.console_proxy import serve_forever

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = asyncio.Event()
    threading.Thread(target=loop.run_until_complete, args=(serve_forever(app, "127.0.0.1", port, ready),),
                     daemon=True).start()
    deadline = time.monotonic() + 10
    while not ready.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError("the console proxy did not listen")
        time.sleep(0.05)
    return f"ws://127.0.0.1:{port}/console/ws"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    from playwright.sync_api import sync_playwright

    from portal.auth_core import hash_password
    from tests.bed import Bed
    from tests.browser_util import CHROMIUM, CHROMIUM_ARGS, log_in

    bed = Bed()
    b1 = bed.up(n=max(2, len(bed.servers() or [])))[0]
    root = Path(tempfile.mkdtemp(prefix="corral-bench-console-"))
    redis_proc, redis_url = _redis(root)
    worker = None
    try:
        app, sid, appliance_id, disk_id, _token = bench_instance(bed, b1, root, redis_url, hash_password(PASSWORD))
        client = app.test_client()
        client.post("/login", data={"username": "bench", "password": PASSWORD})
        cookie_obj = client.get_cookie(app.config["SESSION_COOKIE_NAME"])
        cookie = f"{cookie_obj.key}={cookie_obj.value}"
        log = open(root / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "portal", "worker"], stdout=log, stderr=subprocess.STDOUT)
        after = _last_task_id(app)
        client.post("/vms/new", data={"name": NAME, "appliance": appliance_id, "memory_mb": 256, "vcpus": 1,
                                      "placement": str(disk_id), "clone": "y"})
        with app.app_context():
            vm_id = db.session.execute(db.select(VM.id).where(VM.name == NAME)).scalar_one()
        _wait_task(app, vm_id, after)
        _boot(app, client, vm_id, b1)
        deadline = time.monotonic() + 60  # the serial shell starts right after READY
        while "CORRAL-HB" not in b1.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError("no heartbeat")
            time.sleep(0.2)

        web, server = _serve(app)
        proxy = _proxy(app)
        app.config.update(CONSOLE_WS_URL=None, CONSOLE_WS_PORT=int(proxy.rsplit(":", 1)[1].split("/")[0]))
        print(f"Corral console benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, guest on "
              f"{b1.name} (test bed, reached over SSH), Chromium headless, median of {args.rounds}")

        frames, keys = [], []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(base_url=web, viewport={"width": 1024, "height": 768})
            context.add_init_script(FIRST_FRAME_PROBE)
            page = context.new_page()
            log_in(page, "bench", PASSWORD)
            for _ in range(args.rounds):
                page.goto(f"/vms/{vm_id}")
                page.get_by_test_id("vm-console").first.click()
                frames.append(page.wait_for_function("() => window.__firstFrame", timeout=60_000).json_value()
                              / 1000)
            page.goto(f"/vms/{vm_id}/console/serial")
            page.wait_for_selector("[data-testid=console-status][data-state=connected]")
            page.wait_for_timeout(500)
            keys = page.evaluate(KEYSTROKES, args.rounds)
            browser.close()
        via_proxy = _proxy_frames(app, client, proxy, vm_id, cookie, args.rounds)
        server.shutdown()

        from portal.vmm import vnc
        from tests.vm_util import bed_session

        with bed_session(b1) as session:
            ends = vnc.endpoints(session, NAME)
        # The browser and the proxy are gone: the pty is free for the raw run.
        raw = json.loads(bed.exec(b1.index, ["python3", "-c", RAW_SCRIPT, str(ends.vnc_port), ends.serial_pty,
                                             str(args.rounds)], timeout=300).stdout)

        med = statistics.median
        print("\nFirst frame")
        print(_line("browser: click Console -> first non-blank frame", frames))
        print(_line("proxy, no browser: token + WebSocket + RFB first update", via_proxy))
        print(_line("raw: RFB to the VNC port on the server", raw["frame"]))
        print(f"  ratio browser/raw {med(frames) / med(raw['frame']):.1f}, proxy/raw "
              f"{med(via_proxy) / med(raw['frame']):.1f}")
        print("\nKeystroke round trip (serial terminal)")
        print(_line("browser: xterm.js input -> echo back at the terminal", [k * 1000 for k in keys], "ms", "6.1f"))
        print(_line("raw: write to the pty on the server -> echo", [k * 1000 for k in raw["key"]], "ms", "6.1f"))
        print(f"  ratio {med(keys) / med(raw['key']):.1f}")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=20)
        bed.virsh(b1.index, "destroy", NAME, check=False)
        bed.virsh(b1.index, "undefine", "--managed-save", NAME, check=False)
        subprocess.run(["rm", "-rf", str(b1.host_path(f"{b1.disk_dir}/corral-vms")),
                        str(b1.host_path(f"{b1.disk_dir}/corral-bases"))], check=False)
        redis_proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
