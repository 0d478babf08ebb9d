"""A manager adds a VM server of the test bed through the pages (real Chromium)."""

from __future__ import annotations

import pytest

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402

from portal.extensions import db  # noqa: E402
from portal.models import Role, Server  # noqa: E402
from tests.browser_util import TASK_TIMEOUT_MS, log_in, new_page  # noqa: E402
from tests.conftest import PASSWORD, csrf_token, log_in_client, make_user, run_worker_burst  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.bed]


def test_manager_adds_a_server_through_the_pages(app, live_server, worker, browser, bed_servers, tmp_path):
    bs = bed_servers[1]
    with app.app_context():
        make_user("boss", Role.MANAGER)
    context, page, problems = new_page(browser, live_server)
    try:
        log_in(page, "boss", PASSWORD)
        page.locator("nav.menu").get_by_role("link", name="VM Servers").click()
        expect(page.get_by_text("No VM servers are registered")).to_be_visible()
        page.get_by_role("link", name="Add a server").click()
        page.get_by_label("Host name", exact=True).fill(bs.name)
        page.get_by_label("Address", exact=False).fill(bs.address)
        page.get_by_label("Root password").fill(bs.root_password)
        page.get_by_role("button", name="Connect").click()

        # The first-contact task runs; the page reloads into the review form when it ends.
        expect(page.get_by_test_id("fingerprint")).to_have_text(bs.host_key_fingerprint, timeout=TASK_TIMEOUT_MS)
        expect(page.get_by_label("Memory (MB)")).not_to_have_value("")
        page.locator("input[name='disks-0-mountpoint']").fill(bs.disk_dir)
        page.get_by_role("button", name="Register server").click()
        expect(page.get_by_test_id("task-pct")).to_have_text("100 %", timeout=TASK_TIMEOUT_MS)

        page.locator("nav.menu").get_by_role("link", name="VM Servers").click()
        row = page.locator("table.list tr", has_text=bs.name)
        expect(row).to_contain_text("up")
        row.get_by_role("link", name=bs.name).click()
        expect(page.get_by_test_id("domain-type")).to_contain_text("QEMU (TCG)")
        expect(page.locator("code", has_text=bs.host_key_fingerprint)).to_be_visible()
        page.screenshot(path=tmp_path / "server-page.png", full_page=True)
        assert not problems.errors, problems.errors
    finally:
        context.close()
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == bs.name)).scalar_one()
        assert [d.mountpoint for d in server.disks] == [bs.disk_dir]


def test_power_user_creates_and_starts_a_vm_through_the_pages(app, live_server, worker, console_follower, browser,
                                                              bed_servers, appliance_image, tmp_path):
    from portal import library
    from tests.conftest import register_bed_server

    app.config["APPLIANCE_CACHE"] = str(appliance_image.parent)
    register_bed_server(app, bed_servers[0])
    with app.app_context():
        make_user("pia", Role.POWER, max_vms=2, max_memory_mb=1024, max_disk_gb=10)
        library.ensure_test_appliance()
        db.session.commit()
    context, page, problems = new_page(browser, live_server)
    try:
        log_in(page, "pia", PASSWORD)
        page.locator("nav.menu").get_by_role("link", name="Library").click()
        page.get_by_role("link", name="Create VM").click()
        page.get_by_label("Name").fill("web1")
        page.get_by_label("Memory (MB)").fill("256")
        page.get_by_role("button", name="Create VM").click()
        expect(page.get_by_test_id("task-pct")).to_have_text("100 %", timeout=TASK_TIMEOUT_MS)
        page.locator("nav.menu").get_by_role("link", name="VMs").click()
        page.get_by_role("link", name="web1").click()
        expect(page.get_by_test_id("vm-state")).to_contain_text("off")
        page.evaluate("window.__corralMarker = 1")
        page.get_by_role("button", name="Power on").click()
        # The state panel updates itself: no reload.
        expect(page.get_by_test_id("vm-state")).to_contain_text("running", timeout=TASK_TIMEOUT_MS)
        expect(page.get_by_test_id("console-log")).to_contain_text("CORRAL-HB", timeout=TASK_TIMEOUT_MS)
        assert page.evaluate("window.__corralMarker") == 1
        page.screenshot(path=tmp_path / "vm-page.png", full_page=True)
        page.get_by_role("button", name="Power off").click()
        expect(page.get_by_test_id("vm-state")).to_contain_text("off", timeout=TASK_TIMEOUT_MS)
        assert not problems.errors, problems.errors
    finally:
        context.close()
    with app.app_context():
        from portal.models import VM

        vm = db.session.execute(db.select(VM).where(VM.name == "web1")).scalar_one()
        vm_id = vm.id
    # Leave nothing on the server.
    client = app.test_client()
    log_in_client(client, "pia")
    client.post(f"/vms/{vm_id}/delete", data={"csrf_token": csrf_token(client, f"/vms/{vm_id}")})

    run_worker_burst()
