"""Behind a reverse proxy: PROXY_FIX_X_FOR trusted proxies decide the client address.

The login throttle counts failures per client address. Behind a proxy every
request comes from the proxy's address, so without ProxyFix one attacker's
guesses slow every user down. With ``PROXY_FIX_X_FOR = 1`` the proxy's
X-Forwarded-For names the client; with the default 0 the header is ignored, so
clients that reach Corral directly cannot choose their own address.

The throttle's delays are short and measured from the last failure, so the
tests read which address each failure was counted against (the Redis keys)
rather than racing a delay; the one HTTP outcome they assert, "the other
client is not slowed", holds whatever the timing.
"""

from __future__ import annotations

import pytest

from portal.extensions import queues
from portal.models import Role
from tests.conftest import PASSWORD, csrf_token, make_user


def _app_with(request, monkeypatch, hops: int | None):
    if hops is not None:
        monkeypatch.setenv("CORRAL_PROXY_FIX_X_FOR", str(hops))  # as an install would set it
    app = request.getfixturevalue("app")
    app.config["LOGIN_ADDRESS_FREE_FAILURES"] = 3
    with app.app_context():
        make_user("pat", Role.REGULAR)
    return app


def _login(app, forwarded_for: str, username: str, password: str):
    client = app.test_client()
    token = csrf_token(client, "/login")
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token},
                       headers={"X-Forwarded-For": forwarded_for})


def _guess_from(app, forwarded_for: str) -> None:
    """Three wrong passwords for three made-up accounts: the address's free failures, all used."""
    for i in range(3):
        assert _login(app, forwarded_for, f"guess{i}", "wrong password").status_code == 401


def _failures_by_address(app) -> dict[str, int]:
    with app.app_context():
        prefix = f"{app.config['QUEUE_PREFIX']}:loginfail:addr:"
        return {key.decode()[len(prefix):]: int(queues.redis.hget(key, "count"))
                for key in queues.redis.scan_iter(prefix + "*")}


def test_one_trusted_proxy_throttles_each_client_separately(request, monkeypatch):
    app = _app_with(request, monkeypatch, 1)
    _guess_from(app, "203.0.113.7")
    assert _failures_by_address(app) == {"203.0.113.7": 3}
    # Another client behind the same proxy is not slowed by the first one's guesses.
    assert _login(app, "198.51.100.20", "pat", PASSWORD).status_code == 302


@pytest.mark.parametrize("hops", [None, 0])
def test_without_trusted_proxies_the_header_is_ignored(request, monkeypatch, hops):
    """The default: a client cannot spread its guesses over addresses it makes up."""
    app = _app_with(request, monkeypatch, hops)
    for i, forwarded in enumerate(("203.0.113.7", "203.0.113.8", "203.0.113.9")):
        assert _login(app, forwarded, f"guess{i}", "wrong password").status_code == 401
    assert _failures_by_address(app) == {"127.0.0.1": 3}


def test_only_the_trusted_hops_are_believed(request, monkeypatch):
    """With one proxy, only the address that proxy appended counts, not what the client put before it."""
    app = _app_with(request, monkeypatch, 1)
    for i, made_up in enumerate(("10.0.0.1", "10.0.0.2", "10.0.0.3")):
        assert _login(app, f"{made_up}, 203.0.113.7", f"guess{i}", "wrong password").status_code == 401
    assert _failures_by_address(app) == {"203.0.113.7": 3}
