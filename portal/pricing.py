"""Price sheets and chargeback: usage records priced by the sheet in force at each hour.

Prices are held as integers in millionths of the currency unit per unit-hour;
charges are computed as exact fractions and rounded to the cent once per
invoice line (half up), so lines always add up to the total.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction

from sqlalchemy import func, select

from . import metering
from .extensions import db
from .models import Appliance, PriceSheet, UsageRecord, User

MICRO = 10**6
GIB = 2**30
# price column -> (usage field, divisor turning the field's unit-seconds into unit-hours, label, unit)
UNITS = {
    "vcpu_hour": ("vcpu_seconds", 3600, "vCPU", "vCPU-hours"),
    "memory_gb_hour": ("memory_mb_seconds", 3600 * 1024, "Memory", "GiB-hours"),
    "disk_gb_hour": ("disk_gb_seconds", 3600, "Disk", "GiB-hours"),
    "running_hour": ("running_seconds", 3600, "Running", "hours"),
    "defined_hour": ("defined_seconds", 3600, "Defined", "hours"),
    "livesync_hour": ("livesync_seconds", 3600, "LiveSync", "hours"),
    "backup_gb_hour": ("backup_byte_seconds", 3600 * GIB, "Backups", "GiB-hours"),
}


class PricingError(ValueError):
    """Bad input for a price sheet or a report (the message says what)."""


def parse_price(text: str, label: str) -> int:
    """'0.0125' -> 12500 millionths; at most six decimals, not negative."""
    text = (text or "").strip() or "0"
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise PricingError(f"{label}: {text!r} is not a number.") from None
    if not value.is_finite() or value < 0:
        raise PricingError(f"{label} must be zero or more.")
    micros = value * MICRO
    if micros != micros.to_integral_value():
        raise PricingError(f"{label}: at most six decimals.")
    if micros > 10**15:
        raise PricingError(f"{label} is too large.")
    return int(micros)


def price_text(micros: int) -> str:
    return format(Decimal(micros) / MICRO, "f").rstrip("0").rstrip(".") or "0"


def add_sheet(name: str, effective: str, appliance_id: int | None, prices: dict[str, str],
              user: User) -> PriceSheet:
    """A new price sheet in force from the start (00:00 UTC) of *effective* (YYYY-MM-DD). Flushes."""
    name = (name or "").strip()
    if not name or len(name) > 64:
        raise PricingError("Give the sheet a name of at most 64 characters.")
    try:
        day = date.fromisoformat((effective or "").strip())
    except ValueError:
        raise PricingError("Effective from must be a date (YYYY-MM-DD).") from None
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    if appliance_id is not None and db.session.get(Appliance, appliance_id) is None:
        raise PricingError("That appliance does not exist.")
    clash = db.session.execute(select(PriceSheet.id).where(
        PriceSheet.effective_from == start,
        PriceSheet.appliance_id.is_(None) if appliance_id is None else PriceSheet.appliance_id == appliance_id)
    ).first()
    if clash:
        raise PricingError(f"A sheet for {'that appliance' if appliance_id else 'all VMs'} already starts on {day}.")
    values = {col: parse_price(prices.get(col, ""), f"{UNITS[col][2]} per {UNITS[col][3][:-1]}") for col in UNITS}
    sheet = PriceSheet(name=name, effective_from=start, appliance_id=appliance_id, created_by_id=user.id, **values)
    db.session.add(sheet)
    db.session.flush()
    return sheet


def sheets() -> list[PriceSheet]:
    return list(db.session.execute(select(PriceSheet).order_by(PriceSheet.effective_from.desc(), PriceSheet.id))
                .scalars())


class SheetIndex:
    """Which sheet is in force at an hour for an appliance: its own newest, else the general newest."""

    def __init__(self, rows: list[PriceSheet]):
        by_key: dict[int | None, list[PriceSheet]] = defaultdict(list)
        for s in sorted(rows, key=lambda s: s.effective_from):
            by_key[s.appliance_id].append(s)
        self._starts = {k: [s.effective_from for s in v] for k, v in by_key.items()}
        self._sheets = dict(by_key)

    def _newest(self, key, hour: datetime) -> PriceSheet | None:
        starts = self._starts.get(key)
        if not starts:
            return None
        i = bisect.bisect_right(starts, hour)
        return self._sheets[key][i - 1] if i else None

    def at(self, hour: datetime, appliance_id: int | None) -> PriceSheet | None:
        own = self._newest(appliance_id, hour) if appliance_id is not None else None
        return own or self._newest(None, hour)


def cents(amount: Fraction) -> int:
    """An exact amount in currency units, rounded half up to whole cents."""
    q, r = divmod(amount.numerator * 100, amount.denominator)
    return q + (1 if 2 * r >= amount.denominator else 0)


@dataclass
class Line:
    """One VM under one price sheet in the period."""

    owner_id: int
    owner_name: str
    vm_id: int
    vm_name: str
    sheet: PriceSheet | None
    first_hour: datetime
    last_hour: datetime
    usage: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    amount: Fraction = Fraction(0)

    @property
    def cents(self) -> int:
        return cents(self.amount)

    def used(self) -> list[str]:
        """The units this line used, in words: ["vCPU 147 vCPU-hours", ...]."""
        out = []
        for col, (_, _, label, unit) in UNITS.items():
            q = self.quantity(col)
            if q:
                out.append(f"{label} {format(q.normalize(), 'f')} {unit}")
        return out

    def quantity(self, col: str) -> Decimal:
        fld, div, _, _ = UNITS[col]
        return (Decimal(self.usage[fld]) / Decimal(div)).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP)


@dataclass
class Report:
    start: datetime
    end: datetime
    owner: User | None
    lines: list[Line]
    daily_cents: list[tuple[date, int]]

    @property
    def total_cents(self) -> int:
        return sum(line.cents for line in self.lines)

    def owners(self) -> list[tuple[str, int]]:
        totals: dict[str, int] = defaultdict(int)
        for line in self.lines:
            totals[line.owner_name] += line.cents
        return sorted(totals.items())


def _amount(usage, sheet: PriceSheet | None) -> Fraction:
    """What *usage* (usage field -> unit-seconds) costs under *sheet*, exactly."""
    if sheet is None:
        return Fraction(0)
    total = Fraction(0)
    for col, (fld, div, _, _) in UNITS.items():
        price = getattr(sheet, col)
        if price:
            total += Fraction(int(usage[fld]) * price, div * MICRO)
    return total


def _sums():
    return [func.sum(getattr(UsageRecord, f)).label(f) for f in metering.USAGE_FIELDS]


def report(start: datetime, end: datetime, owner: User | None) -> Report:
    """Charges for the hours in [start, end): one line per VM and sheet, for *owner* or everyone.

    The database sums the hours: once per VM for each stretch of the period
    in which no price sheet starts (the price is the same for all its hours),
    and once per hour and appliance for the daily chart.
    """
    all_sheets = sheets()
    index = SheetIndex(all_sheets)
    mine = [UsageRecord.owner_id == owner.id] if owner else []
    cuts = sorted({s.effective_from for s in all_sheets if start < s.effective_from < end} | {start, end})
    lines: dict[tuple, Line] = {}
    for lo, hi in zip(cuts, cuts[1:]):
        rows = db.session.execute(
            select(UsageRecord.owner_id, UsageRecord.vm_id, UsageRecord.appliance_id,
                   func.max(UsageRecord.owner_name).label("owner_name"), func.max(UsageRecord.vm_name).label("vm_name"),
                   func.min(UsageRecord.hour).label("first"), func.max(UsageRecord.hour).label("last"), *_sums())
            .where(UsageRecord.hour >= lo, UsageRecord.hour < hi, *mine)
            .group_by(UsageRecord.owner_id, UsageRecord.vm_id, UsageRecord.appliance_id)).all()
        for r in rows:
            sheet = index.at(lo, r.appliance_id)
            key = (r.owner_id, r.vm_id, sheet.id if sheet else None)
            line = lines.get(key)
            if line is None:
                line = lines[key] = Line(r.owner_id, r.owner_name, r.vm_id, r.vm_name, sheet, r.first, r.last)
            line.first_hour, line.last_hour = min(line.first_hour, r.first), max(line.last_hour, r.last)
            usage = r._mapping
            for fld in metering.USAGE_FIELDS:
                line.usage[fld] += int(usage[fld])
            line.amount += _amount(usage, sheet)
    daily: dict[date, Fraction] = defaultdict(Fraction)
    for r in db.session.execute(
            select(UsageRecord.hour, UsageRecord.appliance_id, *_sums())
            .where(UsageRecord.hour >= start, UsageRecord.hour < end, *mine)
            .group_by(UsageRecord.hour, UsageRecord.appliance_id)).all():
        daily[r.hour.date()] += _amount(r._mapping, index.at(r.hour, r.appliance_id))
    days = []
    day = start.date()
    while day < end.date():
        days.append((day, cents(daily.get(day, Fraction(0)))))
        day += timedelta(days=1)
    ordered = sorted(lines.values(), key=lambda ln: (ln.owner_name, ln.vm_name, ln.vm_id, ln.first_hour))
    return Report(start, end, owner, ordered, days)


def period(month: str | None, since: str | None, until: str | None, today: date) -> tuple[datetime, datetime, str]:
    """[start, end) in UTC and a label, from ``month`` (YYYY-MM) or ``since``/``until`` (dates, inclusive)."""
    try:
        if since or until:
            first = date.fromisoformat(since) if since else today.replace(day=1)
            last = date.fromisoformat(until) if until else today
            label = f"{first} to {last}"
        else:
            year, mon = map(int, (month or f"{today:%Y-%m}").split("-"))
            first = date(year, mon, 1)
            last = (first.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
            label = f"{first:%B %Y}"
        if last < first:
            raise PricingError("The period ends before it starts.")
        if (last - first).days > 366:
            raise PricingError("A report covers at most a year.")
        start = datetime(first.year, first.month, first.day, tzinfo=timezone.utc)
        end = datetime(last.year, last.month, last.day, tzinfo=timezone.utc) + timedelta(days=1)
    except (ValueError, OverflowError) as exc:
        if isinstance(exc, PricingError):
            raise
        raise PricingError("Give a month as YYYY-MM or dates as YYYY-MM-DD.") from None
    return start, end, label


def money(c: int) -> str:
    sign = "-" if c < 0 else ""
    c = abs(c)
    return f"{sign}{c // 100:,}.{c % 100:02d}"


# --- the chart ------------------------------------------------------------------

def svg_chart(days: list[tuple[date, int]], currency: str) -> str:
    """Daily charges as bars (server-rendered SVG, no script)."""
    from html import escape

    w, h, pad_l, pad_b, pad_t = 720, 200, 64, 24, 10
    pw, ph = w - pad_l - 10, h - pad_t - pad_b
    head = f'<svg class="graph" viewBox="0 0 {w} {h}" role="img" aria-label="Daily charges" xmlns="http://www.w3.org/2000/svg">'
    axis = (f'<line class="axis" x1="{pad_l}" y1="{pad_t + ph}" x2="{w - 10}" y2="{pad_t + ph}"/>'
            f'<line class="axis" x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + ph}"/>')
    top = max([c for _, c in days] + [1])
    n = max(len(days), 1)
    bw = pw / n
    bars = []
    for i, (day, c) in enumerate(days):
        bh = ph * c / top
        bars.append(f'<rect class="bar" x="{pad_l + i * bw + 1:.1f}" y="{pad_t + ph - bh:.1f}" '
                    f'width="{max(bw - 2, 1):.1f}" height="{bh:.1f}"><title>{day}: {money(c)} '
                    f'{escape(currency)}</title></rect>')
    ticks = "".join(f'<text x="{pad_l - 6}" y="{pad_t + ph * (1 - f) + 4:.1f}" text-anchor="end">'
                    f'{money(round(top * f))}</text>' for f in (0, 0.5, 1))
    labels = ""
    if days:
        labels = (f'<text x="{pad_l}" y="{h - 6}">{days[0][0]}</text>'
                  f'<text x="{w - 10}" y="{h - 6}" text-anchor="end">{days[-1][0]}</text>')
    return head + axis + ticks + labels + "".join(bars) + "</svg>"
