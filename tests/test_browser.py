"""End-to-end tests in a real Chromium (Playwright, sync API).

Everything a user does goes through the pages, with real clicks and typing:
the login form, the menus, the new-user form, the export button, the
htmx-polled task page and the download. The database is used directly only to
seed data (users to start from, action-log rows, a VM) and to check results.

Run only these with ``pytest -m browser``. They drive Debian's
``/usr/bin/chromium`` and skip when it is absent (``playwright install`` is
never needed).

Warnings: pyproject sets ``filterwarnings = error``. Playwright's sync API
itself raises no warning here (Python 3.11, Playwright 1.65), so no
``filterwarnings`` mark is needed for it.
"""

from __future__ import annotations

import csv
import os
import re
from datetime import timedelta

import pytest

from portal.extensions import db
from portal.models import ActionLog, Role, Task, User, utcnow

from .browser_util import (
    CHROMIUM, MANAGER_MENU, NON_MANAGER_MENU, TASK_TIMEOUT_MS, log_in, menu_labels,
    new_page, worker_paused,
)
from .conftest import PASSWORD, make_server, make_user, make_vm

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the browser tests drive it",
                allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SEEDED_ROWS = 3000

# JavaScript run on the task page: marks the document and the first-rendered
# status panel, and records every distinct "<data-state> <pct>" the panel shows.
WATCH_STATUS_PANEL = """() => {
    window.__corralMarker = 'task-page';
    window.__statusSeen = [];
    const record = () => {
        const s = document.querySelector('#task-status');
        if (!s) return;
        const entry = s.dataset.state + ' ' + s.querySelector('[data-testid=task-pct]').textContent.trim();
        if (window.__statusSeen[window.__statusSeen.length - 1] !== entry) window.__statusSeen.push(entry);
    };
    document.querySelector('#task-status').dataset.firstRender = 'yes';
    record();
    new MutationObserver(record).observe(document.querySelector('main'), {childList: true, subtree: true});
}"""


def _seed_actionlog(app, user_id: int, n: int, *, action: str) -> None:
    start = utcnow() - timedelta(days=30)
    rows = [
        {"user_id": user_id, "action": action, "target_type": "vm", "target_id": i, "target_label": f"seed-vm-{i}",
         "detail": f"{action} row {i}", "address": "192.0.2.7", "at": start + timedelta(seconds=i)}
        for i in range(n)
    ]
    with app.app_context():
        db.session.execute(db.insert(ActionLog), rows)
        db.session.commit()


def test_manager_creates_power_user_who_exports_action_log(app, live_server, worker, browser, tmp_path):
    with app.app_context():
        boss_id = make_user("boss", Role.MANAGER).id
    _seed_actionlog(app, boss_id, 25, action="boss-only")  # must not be in the power user's export

    # 1. The manager logs in through the form and sees the manager menu.
    m_ctx, mpage, m_problems = new_page(browser, live_server)
    log_in(mpage, "boss", PASSWORD)
    expect(mpage.get_by_role("heading", name="Summary")).to_be_visible()
    assert menu_labels(mpage) == MANAGER_MENU
    expect(mpage.locator("header .who")).to_contain_text("boss")
    expect(mpage.locator("header .who .role")).to_have_text("Manager")

    # 2. Users -> New user: a power user with quotas; the one-time password is shown once.
    mpage.locator("nav.menu").get_by_role("link", name="Users", exact=True).click()
    expect(mpage.get_by_role("heading", name="Users", exact=True)).to_be_visible()
    mpage.get_by_role("link", name="New user").click()
    expect(mpage.get_by_role("heading", name="New user")).to_be_visible()
    mpage.get_by_label("Username").fill("pia")
    mpage.get_by_label("Role").select_option(label="Power user")
    mpage.get_by_label("Email").fill("pia@example.org")
    mpage.get_by_label("Max VMs").fill("7")
    mpage.get_by_label("Max memory (MB)").fill("12288")
    mpage.get_by_label("Max disk (GB)").fill("150")
    mpage.get_by_role("button", name="Create user").click()
    expect(mpage.get_by_role("heading", name="Created pia")).to_be_visible()
    password = mpage.get_by_test_id("new-password").inner_text().strip()
    assert len(password) >= app.config["PASSWORD_MIN_LENGTH"] and " " not in password
    # The users list shows the new user with the quotas typed in.
    mpage.get_by_role("link", name="Back to users").click()
    row = mpage.locator("#users tr", has=mpage.get_by_role("link", name="pia", exact=True))
    expect(row).to_contain_text("Power user")
    expect(row).to_contain_text("0 / 7")
    expect(row).to_contain_text("0 / 12288 MB")
    expect(row).to_contain_text("0 / 150 GB")
    with app.app_context():
        pia = db.session.execute(db.select(User).where(User.username == "pia")).scalar_one()
        assert (pia.role, pia.email, pia.max_vms, pia.max_memory_mb, pia.max_disk_gb) == (
            "power", "pia@example.org", 7, 12288, 150)
        pia_id = pia.id
    _seed_actionlog(app, pia_id, SEEDED_ROWS, action="seeded")

    # 3. In a second context the power user logs in with that password: their menu and quota meters.
    p_ctx, page, p_problems = new_page(browser, live_server)
    log_in(page, "pia", password)
    expect(page.get_by_role("heading", name="Summary")).to_be_visible()
    assert menu_labels(page) == NON_MANAGER_MENU
    nav = page.locator("nav.menu")
    expect(nav.get_by_role("link", name="VM Servers")).to_have_count(0)
    expect(nav.get_by_role("link", name="Users")).to_have_count(0)
    expect(page.locator("header .who .role")).to_have_text("Power user")
    quota = page.locator(".tile", has=page.get_by_role("heading", name="My quota"))
    for label, text, limit in [("VMs", "0 / 7", "7"), ("Memory", "0 / 12288 MB", "12288"),
                               ("Disk", "0 / 150 GB", "150")]:
        meter_row = quota.locator(".meter-row", has=page.locator(".meter-label", has_text=re.compile(f"^{label}$")))
        expect(meter_row).to_contain_text(text)
        expect(meter_row.locator("meter")).to_have_attribute("max", limit)
        expect(meter_row.locator("meter")).to_have_attribute("value", "0")
    expect(page.get_by_test_id("vm-total")).to_have_text("0")

    # 4. My action log -> Export as CSV -> the task page, updated by htmx polling until done.
    nav.get_by_role("link", name="My action log").click()
    expect(page.get_by_role("heading", name="My action log")).to_be_visible()
    status_polls: list[str] = []
    page.on("request", lambda req: req.headers.get("hx-request") == "true" and status_polls.append(req.url))
    navigations: list[str] = []

    # A 3000-row export takes ~0.1 s, less than one poll interval. With the worker
    # held, the task page is certainly first rendered (and polled once) while queued.
    with worker_paused(worker):
        page.get_by_role("button", name="Export as CSV").click()
        page.wait_for_url(re.compile(r"/tasks/\d+$"))
        task_id = int(page.url.rsplit("/", 1)[1])
        status = page.locator("section.task-status")
        expect(page.get_by_role("heading", name="Export pia's action log")).to_be_visible()
        expect(status).to_have_attribute("data-state", "queued")
        expect(page.get_by_test_id("task-pct")).to_have_text("0 %")
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
        page.evaluate(WATCH_STATUS_PANEL)
        page.on("framenavigated", lambda frame: frame == page.main_frame and navigations.append(frame.url))
        # htmx polls while the task is queued, and swaps in a fresh panel.
        with page.expect_response(lambda r: r.url.endswith(f"/tasks/{task_id}/_status"),
                                  timeout=TASK_TIMEOUT_MS) as first_poll:
            pass
        assert first_poll.value.status == 200
        expect(page.locator("#task-status[data-first-render]")).to_have_count(0)
        expect(status).to_have_attribute("data-state", "queued")
        expect(status).to_have_attribute("hx-trigger", re.compile(r"^every "))

    expect(status).to_have_attribute("data-state", "succeeded", timeout=TASK_TIMEOUT_MS)
    expect(page.get_by_test_id("task-pct")).to_have_text("100 %")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    # Same document throughout: no navigation, the marker survived, the panel was swapped by htmx.
    assert navigations == []
    assert page.evaluate("window.__corralMarker") == "task-page"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert set(status_polls) == {f"{live_server}/tasks/{task_id}/_status"}
    seen = page.evaluate("window.__statusSeen")
    print(f"status panel showed {seen} over {len(status_polls)} polls")
    assert seen[0] == "queued 0 %" and seen[-1] == "succeeded 100 %", seen
    pcts = [int(entry.split()[1]) for entry in seen]
    assert pcts == sorted(pcts), f"the progress bar went backwards: {seen}"
    assert status.get_attribute("hx-trigger") is None  # finished: polling stopped
    page.screenshot(path=tmp_path / "task-page.png", full_page=True)

    # The Download CSV link (swapped in by htmx) gives this user's rows, and only theirs.
    download_url = f"{live_server}/tasks/{task_id}/download"
    p_problems.downloads.add(download_url)
    with page.expect_download() as download_info:
        status.get_by_role("link", name="Download CSV").click()
    download = download_info.value
    assert download.url == download_url
    assert download.suggested_filename == f"corral-actionlog-{task_id}.csv"
    with open(download.path(), newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["time (UTC)", "user", "action", "target", "detail", "address", "task"]
    body = rows[1:]
    assert {r[1] for r in body} == {"pia"}
    assert "boss-only" not in {r[2] for r in body}
    seeded = [r for r in body if r[2] == "seeded"]
    assert sorted(r[4] for r in seeded) == sorted(f"seeded row {i}" for i in range(SEEDED_ROWS))
    assert {"login", "task:export-actionlog"} <= {r[2] for r in body}
    with app.app_context():
        task = db.session.get(Task, task_id)
        assert (task.state, task.pct, task.requester_id, task.kind) == ("succeeded", 100, pia_id, "export-actionlog")
        own = db.session.execute(db.select(db.func.count(ActionLog.id)).where(ActionLog.user_id == pia_id)).scalar_one()
    assert len(body) == own  # every one of pia's rows (she did nothing after submitting)
    assert navigations == []  # the download did not navigate away either

    assert p_problems.errors == [], p_problems.errors
    assert m_problems.errors == [], m_problems.errors
    p_ctx.close()
    m_ctx.close()


def test_summary_refreshes_itself(app, live_server, browser):
    with app.app_context():
        user_id = make_user("paul", Role.POWER, max_vms=3, max_memory_mb=4096, max_disk_gb=50).id
    ctx, page, problems = new_page(browser, live_server)
    log_in(page, "paul", PASSWORD)
    total = page.get_by_test_id("vm-total")
    expect(total).to_have_text("0")
    page.evaluate("window.__corralMarker = 'summary-page'")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: frame == page.main_frame and navigations.append(frame.url))
    panel_polls: list[str] = []
    page.on("request", lambda req: req.headers.get("hx-request") == "true" and panel_polls.append(req.url))

    with app.app_context():
        make_vm(db.session.get(User, user_id), "fresh", server=make_server(), memory_mb=1024, disk_gb=20,
                state="running")

    # The panel refreshes every SUMMARY_REFRESH_SECONDS (5 s); allow three periods.
    expect(total).to_have_text("1", timeout=app.config["SUMMARY_REFRESH_SECONDS"] * 3000)
    vms_tile = page.locator(".tile", has=total)
    expect(vms_tile.locator(".badge.state-running")).to_have_text("1 running")
    quota = page.locator(".tile", has=page.get_by_role("heading", name="My quota"))
    expect(quota).to_contain_text("1 / 3")
    expect(quota).to_contain_text("1024 / 4096 MB")
    expect(quota).to_contain_text("20 / 50 GB")
    assert navigations == []
    assert page.evaluate("window.__corralMarker") == "summary-page"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert panel_polls and set(panel_polls) == {f"{live_server}/_summary"}
    assert problems.errors == [], problems.errors
    ctx.close()
