"""Stored script injection: names and descriptions never run as script, in a real Chromium.

Names used to land inside inline ``onsubmit="return confirm('…{{ name }}…')"``
attributes, where HTML escaping does not protect JavaScript: the browser
decodes ``&#39;`` back to a quote before running the handler, so an appliance
called ``x'+alert(1)+'`` ran ``alert(1)`` when a manager clicked Delete.
Confirmation texts now live in ``data-confirm`` attributes read by one script
(static/js/corral.js). Rows carrying the payloads are put straight into the
database (whatever the name rules of the forms say, as a row imported or
migrated from elsewhere could be) and every page that shows them is opened and
every delete button clicked; a confirm dialog is expected, an alert never.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from portal import catalog
from portal.extensions import db
from portal.models import VM, Appliance, Role, Server, Task
from tests.browser_util import log_in, new_page
from tests.conftest import PASSWORD, make_server, make_user, make_vm

# Breaks out of a quoted JavaScript string in an expression, in a statement list, and out of HTML.
PAYLOADS = ("'+alert(1)+'", "');alert(1);('", "<img src=x onerror=alert(1)>")
EVIL = "x" + "".join(PAYLOADS)  # 58 characters: fits an appliance name, a username, a hostname
TEMPLATES = Path(__file__).resolve().parent.parent / "portal" / "templates"


@pytest.fixture
def evil(app) -> dict:
    """A manager, and a server, user, appliance, VM, task and catalog entry all named with the payloads."""
    with app.app_context():
        make_user("boss", Role.MANAGER)
        owner = make_user(f"u{EVIL}")
        server = make_server(f"s{EVIL}", address="127.0.0.1")  # never contacted: no worker runs here
        appliance = Appliance(name=EVIL, description=" ".join(PAYLOADS), state="ready")
        db.session.add(appliance)
        db.session.commit()
        vm = make_vm(owner, "evil1", server=server, appliance_id=appliance.id)
        db.session.add(Task(kind="vm-start", title=f"Start {EVIL}", requester_id=owner.id, target_type="vm",
                            target_id=vm.id, state="failed", log=" ".join(PAYLOADS)))
        db.session.commit()
        catalog.save({"url": "https://catalog.invalid/index.json", "fetched_at": None, "error": None, "entries": [
            {"name": f"c{EVIL}", "description": " ".join(PAYLOADS), "min_memory_mb": 128, "max_memory_mb": 512,
             "vcpus": 1, "disk_gb": 1, "size_bytes": 1 << 20,
             "disks": [{"url": "https://catalog.invalid/c.qcow2", "sha256": "0" * 64, "size_bytes": 1 << 20}]}]})
        return {"vm": vm.id, "server": server.id, "appliance": appliance.id}


class Dialogs:
    """Every dialog the page opens, answered: confirms dismissed unless told otherwise."""

    def __init__(self, page) -> None:
        self.seen: list[tuple[str, str]] = []
        self.accept = False
        page.on("dialog", self._on)

    def _on(self, dialog) -> None:
        self.seen.append((dialog.type, dialog.message))
        dialog.accept() if self.accept and dialog.type == "confirm" else dialog.dismiss()

    @property
    def alerts(self) -> list[str]:
        return [message for kind, message in self.seen if kind != "confirm"]


def _settle(page) -> None:
    """Script runs only after every open dialog was answered, so this returns after all of them."""
    page.evaluate("1")


def _page_is_clean(page, where: str, shown: str) -> None:
    assert page.locator("img[src=x]").count() == 0, f"{where}: an injected <img> became an element"
    assert shown in page.locator("main").inner_text(), f"{where}: the text is not shown as text"


@pytest.mark.browser
def test_names_and_descriptions_never_run_as_script(app, live_server, browser, evil):
    ctx, page, problems = new_page(browser, live_server)
    dialogs = Dialogs(page)
    log_in(page, "boss", PASSWORD)

    pages = [("/vms/", f"u{EVIL}"), (f"/vms/{evil['vm']}", EVIL), ("/library/", EVIL),
             ("/library/catalog", f"c{EVIL}"), (f"/servers/{evil['server']}", f"s{EVIL}"), ("/tasks/", EVIL)]
    for url, shown in pages:
        page.goto(url)
        _page_is_clean(page, url, shown)
        _settle(page)

    deletes = [(f"/vms/{evil['vm']}", "Delete VM", "Delete evil1?"),
               ("/library/", "Delete", f"Delete the appliance {EVIL}?"),
               (f"/servers/{evil['server']}", "Delete server definition", f"Delete the definition of s{EVIL}?")]
    for url, button, question in deletes:
        page.goto(url)
        before = len(dialogs.seen)
        page.get_by_role("button", name=button, exact=True).click()
        _settle(page)
        assert dialogs.seen[before:] == [("confirm", dialogs.seen[before][1])], (url, dialogs.seen[before:])
        assert dialogs.seen[before][1].startswith(question), (url, dialogs.seen[before][1])
        assert page.url == f"{live_server}{url}"  # dismissed: no request was sent

    assert dialogs.alerts == [], dialogs.alerts
    assert not [e for e in problems.errors if e.startswith("pageerror")], problems.errors
    with app.app_context():  # nothing was deleted by a dismissed confirmation
        assert db.session.get(VM, evil["vm"]) and db.session.get(Appliance, evil["appliance"])
        assert db.session.get(Server, evil["server"])
    ctx.close()


@pytest.mark.browser
def test_an_accepted_confirmation_submits(app, live_server, browser, evil):
    """The one script only stops what the user declined; accepted, the form posts as before."""
    ctx, page, _ = new_page(browser, live_server)
    dialogs = Dialogs(page)
    dialogs.accept = True
    log_in(page, "boss", PASSWORD)
    page.goto("/library/")
    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_text("Deleted the appliance").wait_for()
    assert [kind for kind, _ in dialogs.seen] == ["confirm"]
    with app.app_context():
        assert db.session.get(Appliance, evil["appliance"]) is None
    ctx.close()


# --- The templates themselves: no template data inside inline JavaScript -------------------

INLINE_HANDLER = re.compile(r"""\s(on[a-z]+|hx-on[\w:.-]*)\s*=\s*("[^"]*"|'[^']*')""", re.I)
INLINE_SCRIPT = re.compile(r"<script\b[^>]*>(.*?)</script>", re.I | re.S)
JS_URL = re.compile(r"""(href|src|action)\s*=\s*["']?\s*javascript:""", re.I)


def _template_sources():
    for path in sorted(TEMPLATES.rglob("*.html")):
        yield path.relative_to(TEMPLATES), path.read_text()


def test_no_template_puts_data_into_inline_javascript():
    """Event-handler attributes and inline scripts hold only constant code; data goes to data-* attributes."""
    problems = []
    for name, text in _template_sources():
        for match in INLINE_HANDLER.finditer(text):
            if "{{" in match.group(2) or "{%" in match.group(2):
                problems.append(f"{name}: {match.group(1)} holds template data: {match.group(2)[:80]}")
        for match in INLINE_SCRIPT.finditer(text):
            if "{{" in match.group(1) or "{%" in match.group(1):
                problems.append(f"{name}: an inline <script> holds template data")
        if JS_URL.search(text):
            problems.append(f"{name}: a javascript: URL")
    assert not problems, "\n".join(problems)


def test_the_confirm_script_is_on_every_page():
    base = (TEMPLATES / "base.html").read_text()
    assert "js/corral.js" in base
    for name, text in _template_sources():
        if "data-confirm" in text and not name.name.startswith("_"):
            assert '{% extends "base.html" %}' in text, f"{name} uses data-confirm outside base.html"
