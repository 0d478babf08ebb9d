"""Server-side SVG graphs of a server's memory and disk use (no JavaScript)."""

from __future__ import annotations

from datetime import datetime, timedelta
from html import escape

from .extensions import db
from .models import ServerSample, utcnow

RANGES = {"1h": ("1 hour", timedelta(hours=1)), "24h": ("24 hours", timedelta(hours=24)),
          "7d": ("7 days", timedelta(days=7))}

W, H, PAD_L, PAD_B, PAD_T, PAD_R = 720, 220, 56, 24, 10, 10


def samples(server_id: int, span: timedelta) -> list[ServerSample]:
    since = utcnow() - span
    return db.session.execute(
        db.select(ServerSample).where(ServerSample.server_id == server_id, ServerSample.at >= since)
        .order_by(ServerSample.at)
    ).scalars().all()


def svg(points: list[tuple[datetime, float, float]], start: datetime, end: datetime, unit: str, label: str) -> str:
    """An area of ``used`` over time with a dashed ``total`` line."""
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    head = (f'<svg class="graph" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg">')
    axis = (f'<line class="axis" x1="{PAD_L}" y1="{PAD_T + ph}" x2="{W - PAD_R}" y2="{PAD_T + ph}"/>'
            f'<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}"/>')
    if not points:
        return (head + axis + f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">No samples in this period yet'
                '</text></svg>')
    top = max(max(p[2] for p in points), max(p[1] for p in points), 1)
    span = max((end - start).total_seconds(), 1)

    def xy(t: datetime, v: float) -> str:
        x = PAD_L + pw * (t - start).total_seconds() / span
        y = PAD_T + ph * (1 - v / top)
        return f"{x:.1f},{y:.1f}"

    used = " ".join(xy(t, u) for t, u, _ in points)
    total = " ".join(xy(t, tot) for t, _, tot in points)
    area = f"{xy(points[0][0], 0)} {used} {xy(points[-1][0], 0)}"
    last_t, last_u, last_tot = points[-1]
    ticks = "".join(
        f'<text x="{PAD_L - 6}" y="{PAD_T + ph * (1 - f) + 4:.1f}" text-anchor="end">{top * f:.0f}</text>'
        for f in (0, 0.5, 1))
    times = (f'<text x="{PAD_L}" y="{H - 6}">{start:%Y-%m-%d %H:%M}</text>'
             f'<text x="{W - PAD_R}" y="{H - 6}" text-anchor="end">{end:%Y-%m-%d %H:%M} UTC</text>')
    return (head + axis + ticks + times + f'<polygon class="area" points="{area}"/>'
            f'<polyline class="line" points="{used}"/><polyline class="total" points="{total}"/>'
            f'<title>{escape(label)}: latest {last_u:.0f} of {last_tot:.0f} {unit} ({last_t:%H:%M})</title></svg>')


def server_graphs(server_id: int, range_key: str) -> tuple[str, str]:
    _, span = RANGES[range_key]
    end = utcnow()
    start = end - span
    rows = samples(server_id, span)
    mem = [(r.at, r.mem_used_mb, r.mem_total_mb) for r in rows]
    disk = [(r.at, r.disk_used_gb, r.disk_total_gb) for r in rows]
    return svg(mem, start, end, "MB", "Memory used"), svg(disk, start, end, "GB", "VM disk used")
