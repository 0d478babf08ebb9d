"""Graph samples are merged into coarser averages as they age, then dropped."""

from __future__ import annotations

from datetime import timedelta

from portal import graphs, monitoring
from portal.extensions import db
from portal.models import ServerSample, utcnow
from tests.conftest import make_server


def _samples(server_id, start, count, step, used):
    return [{"server_id": server_id, "at": start + i * step, "resolution": 0, "mem_used_mb": used + i,
             "mem_total_mb": 1000, "disk_used_gb": 10, "disk_total_gb": 100} for i in range(count)]


def _store(rows: list[dict]) -> None:
    db.session.execute(db.insert(ServerSample), rows)
    db.session.commit()


def _count() -> int:
    return db.session.execute(db.select(db.func.count(ServerSample.id))).scalar_one()


def test_old_samples_are_downsampled_and_the_oldest_dropped(app):
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    with app.app_context():
        sid = make_server().id
        rows = (_samples(sid, now - timedelta(minutes=30), 60, timedelta(seconds=30), 100)  # recent: kept raw
                + _samples(sid, now - timedelta(hours=5), 120, timedelta(seconds=30), 200)  # 1 h of raw -> 12 x 5 min
                + _samples(sid, now - timedelta(days=9), 10, timedelta(seconds=30), 300))  # too old: dropped
        _store(rows)
        removed = monitoring.compact_samples(now)
        by_res = dict(db.session.execute(
            db.select(ServerSample.resolution, db.func.count()).group_by(ServerSample.resolution)).all())
        assert by_res == {0: 60, 300: 12}
        assert removed == 190 - 72
        five = db.session.execute(db.select(ServerSample).where(ServerSample.resolution == 300)
                                  .order_by(ServerSample.at)).scalars().all()
        assert five[0].mem_used_mb == sum(range(200, 210)) // 10  # the average of its ten 30-second samples
        # Three days later the 5-minute rows become hourly ones.
        monitoring.compact_samples(now + timedelta(days=3))
        by_res = dict(db.session.execute(
            db.select(ServerSample.resolution, db.func.count()).group_by(ServerSample.resolution)).all())
        assert by_res.get(300, 0) == 0 and by_res[3600] >= 1


def test_compaction_leaves_the_commit_to_its_caller(app):
    """compact_samples flushes; the poll job commits once (a rollback undoes the compaction)."""
    now = utcnow()
    with app.app_context():
        _store(_samples(make_server().id, now - timedelta(days=9), 10, timedelta(seconds=30), 300))
        assert monitoring.compact_samples(now) == 10
        assert _count() == 0  # flushed
        db.session.rollback()
        assert _count() == 10


def test_svg_graph_draws_used_and_total(app):
    now = utcnow()
    with app.app_context():
        sid = make_server().id
        _store(_samples(sid, now - timedelta(minutes=20), 20, timedelta(minutes=1), 400))
        mem, disk = graphs.server_graphs(sid, "1h")
    assert mem.startswith("<svg") and 'class="line"' in mem and 'class="total"' in mem
    assert "latest 419 of 1000 MB" in mem
    empty = graphs.svg([], now - timedelta(hours=1), now, "MB", "Memory used")
    assert "No samples in this period yet" in empty
