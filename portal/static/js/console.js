/* The web console page: ask for a one-shot token, open the WebSocket to corral console-proxy,
   draw with noVNC (graphical) or xterm.js (serial), and reconnect with a fresh token on a drop. */
(function () {
  "use strict";
  const screen = document.getElementById("console-screen");
  const status = document.getElementById("console-status");
  const kind = screen.dataset.kind;
  const csrf = JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"];
  let session = null;   // the open RFB, or {ws, input} for the serial terminal
  let term = null;      // the serial terminal survives reconnections
  let retries = 0;
  const say = (text, state) => { status.textContent = text; status.dataset.state = state; };

  function wsUrl(token) {
    // CONSOLE_WS_URL, else the proxy's own port on the host this page came from (corral up), else
    // this page's origin and path prefix (a reverse proxy routes /console/ws/ to the proxy).
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    let base = screen.dataset.wsBase;
    if (base) base = base.replace(/\/$/, "") + "/" + kind;
    else if (screen.dataset.wsPort) base = scheme + location.hostname + ":" + screen.dataset.wsPort + "/console/ws/" + kind;
    else base = scheme + location.host + screen.dataset.wsPath;
    return base + "?token=" + encodeURIComponent(token);
  }

  async function connect() {
    say("Connecting…", "connecting");
    let r;
    try {
      r = await fetch(screen.dataset.tokenUrl, {method: "POST", headers: {"X-CSRFToken": csrf}, credentials: "same-origin"});
    } catch (e) {
      return later("The portal does not answer; retrying…");
    }
    const body = await r.json().catch(() => ({}));
    if (r.status === 409) return later(body.error || "The VM is not running.", "off");
    if (!r.ok || !body.token) return say("The console cannot be opened (" + r.status + ").", "error");
    (kind === "vnc" ? openVnc : openSerial)(wsUrl(body.token));
  }

  function later(text, state) {
    say(text, state || "retrying");
    retries += 1;
    setTimeout(connect, Math.min(10000, 1000 * retries));
  }

  function dropped(code, reason) {
    session = null;
    if (code === 1008) return say("The console was refused (the link expired or you lost access). Reload to try again.", "refused");
    if (code === 1011) return later("The VM's server does not answer; retrying…", "down");
    if (code === 4000) return later("The VM stopped or your access ended; retrying…", "off");
    later("The connection dropped; reconnecting…");
  }

  function openVnc(url) {
    const rfb = new RFB(screen, url, {wsProtocols: []});
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.addEventListener("connect", () => { retries = 0; say("Connected", "connected"); rfb.focus(); });
    rfb.addEventListener("disconnect", () => dropped(lastClose.code, lastClose.reason));
    const lastClose = {code: 1006, reason: ""};
    // noVNC does not report the close code: read it from its socket.
    const sock = rfb._sock && rfb._sock._websocket;
    if (sock) sock.addEventListener("close", (e) => { lastClose.code = e.code; lastClose.reason = e.reason; });
    session = rfb;
  }

  function openSerial(url) {
    if (!term) {
      term = new Terminal({convertEol: false, cursorBlink: true});
      term.open(screen);
      screen.terminal = term;  // its scrollback, for scripts and tests driving the page
    }
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    const enc = new TextEncoder();
    ws.onopen = () => { retries = 0; say("Connected", "connected"); term.focus(); };
    ws.onmessage = (e) => term.write(typeof e.data === "string" ? e.data : new Uint8Array(e.data));
    ws.onclose = (e) => { if (session && session.ws === ws) { session.ws = null; dropped(e.code, e.reason); } };
    if (session && session.input) session.input.dispose();
    const input = term.onData((d) => { if (ws.readyState === 1) ws.send(enc.encode(d)); });
    session = {ws, input};
  }

  const cad = document.getElementById("console-cad");
  if (cad) cad.addEventListener("click", () => session && session.sendCtrlAltDel && session.sendCtrlAltDel());
  const paste = document.getElementById("console-paste");
  if (paste) paste.addEventListener("click", () => {
    const text = document.getElementById("console-paste-text").value;
    if (!session || !session.sendKey) return;
    for (const ch of text) {
      if (ch === "\n") session.sendKey(0xff0d, "Enter");
      else { const c = ch.codePointAt(0); session.sendKey(c < 0x100 ? c : 0x1000000 + c); }
    }
  });
  document.getElementById("console-full").addEventListener("click", () => screen.requestFullscreen && screen.requestFullscreen());
  connect();
})();
