"""Helpers for the Playwright browser tests (tests/test_browser.py).

Kept apart from conftest.py so that importing Playwright is confined to the
browser tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]

# Playwright's own timeouts (ms): generous, since the machine may be loaded.
DEFAULT_TIMEOUT_MS = 20_000
TASK_TIMEOUT_MS = 60_000

MANAGER_MENU = ["Summary", "VMs", "Clusters", "VM Servers", "Networks", "Library", "License keys", "Attributes",
                "Users", "Tasks", "Action log", "Catalog", "Usage"]
NON_MANAGER_MENU = ["Summary", "VMs", "Clusters", "Library", "My tasks", "My action log", "Catalog", "Usage"]


@dataclass
class PageProblems:
    """JavaScript errors, console errors and failed requests seen by one page."""

    errors: list[str] = field(default_factory=list)
    # Chromium reports a navigation that turns into a download as failed with
    # net::ERR_ABORTED; a test lists the download URLs it expects here.
    downloads: set[str] = field(default_factory=set)

    def watch(self, page) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)
        page.on("requestfailed", self._failed)

    def _console(self, msg) -> None:
        if msg.type != "error":
            return
        # Corral serves no /favicon.ico; Chromium's automatic fetch of it 404s.
        # Known and harmless (noted in the test report), so not counted here.
        if msg.location.get("url", "").endswith("/favicon.ico"):
            return
        self.errors.append(f"console: {msg.text} at {msg.location.get('url')}")

    def _failed(self, req) -> None:
        if req.url in self.downloads and req.failure == "net::ERR_ABORTED":
            return
        self.errors.append(f"requestfailed: {req.method} {req.url} {req.failure}")


def new_page(browser, base_url: str):
    """A fresh context (own cookies: one per user) and a page in it."""
    context = browser.new_context(base_url=base_url, accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    page = context.new_page()
    problems = PageProblems()
    problems.watch(page)
    return context, page, problems


def log_in(page, username: str, password: str, prefix: str = "") -> None:
    """Log in through the login form, as a person would (*prefix*: a reverse proxy's sub-path)."""
    page.goto(f"{prefix}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: not url.split("?")[0].endswith("/login"))


def menu_labels(page) -> list[str]:
    return [t.strip() for t in page.locator("nav.menu a").all_inner_texts()]


@contextlib.contextmanager
def worker_paused(proc: subprocess.Popen) -> Iterator[None]:
    """Hold a (test-started) worker process with SIGSTOP; always resume it.

    Used so a task is still queued when its page is first rendered, which makes
    "the page was then updated by polling" deterministic instead of a race
    against a fast job.
    """
    assert proc.poll() is None, "the worker is not running"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)
