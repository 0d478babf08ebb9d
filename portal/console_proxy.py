"""``corral console-proxy``: the browser's console WebSocket, relayed to a guest's VNC port or serial pty.

The browser opens ``ws(s)://<portal>/console/ws/<vnc|serial>?token=...`` (a
reverse proxy routes that path here; see README). The proxy knows the user by
the portal's own session cookie, which the browser sends with the upgrade,
and lets the connection through only when the token redeems for that user
and kind (console_tokens: single use, short-lived), the user may still
operate the VM and the VM runs. It then relays bytes both ways through
``vmm.vnc`` (an SSH stream with Corral's pinned key, or a direct loopback
connection for the local server). Every few seconds it checks again and
closes the session when the VM stopped or moved, or the user lost access
(owner changed, user disabled, logged out everywhere). A refused connection
is closed with code 1008 before a single byte of the console is sent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlparse

from flask import Flask
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import console_tokens, servers
from .auth_core import load_user
from .extensions import db
from .models import VM, VMState
from .permissions import can_operate_vm
from .vmm import vnc
from .vmm.errors import VmmError
from .vmm.session import Target

log = logging.getLogger(__name__)

REFUSED = 1008  # policy violation: bad token, no access
GONE = 4000  # the VM stopped or moved, or the user lost access, during the session
CHUNK = 65536


@dataclass(frozen=True)
class _Access:
    user_id: int
    vm_id: int
    server_id: int


class ConsoleRefused(Exception):
    pass


class ConsoleProxy:
    def __init__(self, app: Flask):
        self.app = app
        self.recheck = float(app.config["CONSOLE_RECHECK_SECONDS"])
        self.endpoints = vnc.EndpointReader()

    # --- checks (blocking: run in a thread, in an app context) ----------------

    def _user_id(self, cookie_header: str | None) -> int | None:
        """The logged-in user of the portal session cookie, as flask-login would load it."""
        if not cookie_header:
            return None
        morsel = SimpleCookie(cookie_header).get(self.app.config["SESSION_COOKIE_NAME"])
        if morsel is None:
            return None
        serializer = self.app.session_interface.get_signing_serializer(self.app)
        try:
            data = serializer.loads(morsel.value, max_age=int(self.app.permanent_session_lifetime.total_seconds()))
        except Exception:  # itsdangerous: bad signature, expired, garbage
            return None
        user = load_user(str(data.get("_user_id", "")))
        return user.id if user is not None else None

    def _still_allowed(self, access: _Access) -> bool:
        vm = db.session.get(VM, access.vm_id)
        user = load_user_by_id(access.user_id)
        return (vm is not None and user is not None and vm.server_id == access.server_id
                and vm.state_enum is VMState.RUNNING and can_operate_vm(user, vm))

    def _admit(self, path: str, cookie: str | None) -> tuple[_Access, Target, str]:
        """Redeem the token and check access; the target and VM name, or ConsoleRefused."""
        with self.app.app_context():
            try:
                parsed = urlparse(path)
                kind = parsed.path.rstrip("/").rsplit("/", 1)[-1]
                token = (parse_qs(parsed.query).get("token") or [""])[0]
                grant = console_tokens.redeem(token, self._user_id(cookie), kind)
                vm = db.session.get(VM, grant.vm_id)
                if vm is None or vm.server is None:
                    raise ConsoleRefused(f"VM {grant.vm_id} is gone")
                access = _Access(grant.user_id, vm.id, vm.server_id)
                if not self._still_allowed(access):
                    raise ConsoleRefused(f"user {grant.user_id} may not open VM {vm.id} now (or it is not running)")
                return access, servers.target_for(vm.server), vm.name
            except console_tokens.ConsoleTokenError as exc:
                raise ConsoleRefused(str(exc)) from exc
            finally:
                db.session.remove()

    def _check(self, access: _Access) -> bool:
        with self.app.app_context():
            try:
                return self._still_allowed(access)
            finally:
                db.session.remove()

    # --- the connection ------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        path = ws.request.path
        try:
            access, target, name = await asyncio.to_thread(self._admit, path, ws.request.headers.get("Cookie"))
            kind = urlparse(path).path.rstrip("/").rsplit("/", 1)[-1]
            ends = await asyncio.to_thread(self.endpoints.endpoints, target, name)
            if kind == "vnc":
                if ends.vnc_port is None:
                    raise ConsoleRefused(f"{name} has no VNC graphics")
                stream = await vnc.open_vnc(target, ends.vnc_port)
            else:
                if ends.serial_pty is None:
                    raise ConsoleRefused(f"{name} has no serial pty")
                stream = await vnc.open_serial(target, ends.serial_pty)
        except ConsoleRefused as exc:
            log.warning("console refused (%s): %s", ws.remote_address, exc)
            await ws.close(REFUSED, "console refused")
            return
        except VmmError as exc:
            log.warning("console unavailable: %s", exc)
            await ws.close(1011, "server unreachable")
            return
        log.info("console %s of VM %s opened for user %s", kind, access.vm_id, access.user_id)
        await self._relay(ws, stream, access)

    async def _relay(self, ws: ServerConnection, stream: vnc.Stream, access: _Access) -> None:
        async def up():
            async for message in ws:
                await stream.write(message.encode() if isinstance(message, str) else message)

        async def down():
            while data := await stream.reader.read(CHUNK):
                await ws.send(data)

        async def watch():
            while True:
                await asyncio.sleep(self.recheck)
                if not await asyncio.to_thread(self._check, access):
                    return "revoked"

        tasks = [asyncio.create_task(c) for c in (up(), down(), watch())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            revoked = any(not t.cancelled() and t.exception() is None and t.result() == "revoked" for t in done)
        finally:
            for t in tasks:
                t.cancel()
            await stream.close()
        try:
            await ws.close(GONE if revoked else 1000, "access ended or VM stopped" if revoked else "console closed")
        except ConnectionClosed:
            pass


def load_user_by_id(user_id: int):
    from .models import User

    user = db.session.get(User, user_id)
    return load_user(f"{user.id}:{user.session_version}") if user is not None else None


async def serve_forever(app: Flask, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    proxy = ConsoleProxy(app)
    try:
        async with serve(proxy.handle, host, port, max_size=2**20, compression=None) as server:
            log.info("console proxy on %s:%s", host, port)
            if ready is not None:
                ready.set()
            await server.serve_forever()
    finally:
        proxy.endpoints.close()
