"""Logging in and out, the account page, CSRF, throttling and cookies."""

from __future__ import annotations

import re

from portal.extensions import db
from portal.models import ActionLog, Role, User
from tests.conftest import PASSWORD, make_user


def csrf_from(html: str) -> str:
    m = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html) or re.search(
        r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token in page"
    return m.group(1)


def login(client, username, password=PASSWORD):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


def test_login_logout_and_action_log(app, client):
    with app.app_context():
        make_user("pat")
    r = login(client, "pat")
    assert r.status_code == 302 and r.headers["Location"] == "/"
    assert client.get("/").status_code == 200
    token = csrf_from(client.get("/account").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/").status_code == 302
    with app.app_context():
        actions = db.session.execute(db.select(ActionLog.action).order_by(ActionLog.id)).scalars().all()
        assert actions == ["login", "logout"]


def test_wrong_password_is_refused_with_a_clear_message(app, client):
    with app.app_context():
        make_user("pat")
    r = login(client, "pat", "not the password")
    assert r.status_code == 401
    assert "Wrong username or password" in r.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_post_without_csrf_token_is_refused(app, client):
    with app.app_context():
        make_user("pat")
    r = client.post("/login", data={"username": "pat", "password": PASSWORD})
    assert r.status_code == 400
    login(client, "pat")
    # A forged cross-site form post to change the email carries no token.
    r = client.post("/account/email", data={"email": "evil@example.org"})
    assert r.status_code == 400
    with app.app_context():
        assert db.session.execute(db.select(User.email).where(User.username == "pat")).scalar_one() is None


def test_htmx_requests_carry_csrf_in_a_header(app, client):
    """Pages put the token in hx-headers; the header form is accepted."""
    with app.app_context():
        make_user("pat")
    login(client, "pat")
    html = client.get("/account").get_data(as_text=True)
    token = re.search(r'hx-headers=\'\{"X-CSRFToken": "([^"]+)"\}\'', html).group(1)
    r = client.post("/account/email", data={"email": "pat@example.org"}, headers={"X-CSRFToken": token})
    assert r.status_code == 302


def test_failed_logins_are_slowed_per_account(app, client):
    with app.app_context():
        make_user("pat")
        make_user("sam")
    for _ in range(app.config["LOGIN_FREE_FAILURES"] + 1):
        login(client, "pat", "wrong password")
    # Even the right password must now wait.
    r = login(client, "pat")
    assert r.status_code == 429
    assert "Too many failed attempts" in r.get_data(as_text=True)
    # Another account from the same address is not affected (address limit is higher).
    assert login(app.test_client(), "sam").status_code == 302


def test_failed_logins_are_slowed_per_address(app):
    app.config["LOGIN_ADDRESS_FREE_FAILURES"] = 3
    with app.app_context():
        make_user("pat")
    client = app.test_client()
    for i in range(4):  # different usernames, same address
        login(client, f"guess{i}", "wrong password")
    assert login(client, "pat").status_code == 429


def test_password_change_logs_out_other_sessions(app):
    with app.app_context():
        make_user("pat")
    a, b = app.test_client(), app.test_client()
    login(a, "pat")
    login(b, "pat")
    token = csrf_from(a.get("/account").get_data(as_text=True))
    r = a.post("/account/password", data={"current": PASSWORD, "new": "a much better password",
                                          "confirm": "a much better password", "csrf_token": token})
    assert r.status_code == 302
    assert a.get("/").status_code == 200  # this session stays
    assert b.get("/").status_code == 302  # the other one is logged out
    assert login(app.test_client(), "pat", "a much better password").status_code == 302
    with app.app_context():
        stored = db.session.execute(db.select(User.password_hash).where(User.username == "pat")).scalar_one()
        assert stored.startswith("scrypt:") and "better" not in stored


def test_password_change_rejections_change_nothing(app, client):
    with app.app_context():
        make_user("pat")
        before = db.session.execute(db.select(User.password_hash)).scalar_one()
    login(client, "pat")
    token = csrf_from(client.get("/account").get_data(as_text=True))
    cases = [
        ({"current": "wrong", "new": "long enough pw", "confirm": "long enough pw"}, "not your current password"),
        ({"current": PASSWORD, "new": "short", "confirm": "short"}, "at least 10 characters"),
        ({"current": PASSWORD, "new": "long enough pw", "confirm": "different pw!"}, "two new passwords differ"),
    ]
    for data, message in cases:
        r = client.post("/account/password", data={**data, "csrf_token": token})
        assert r.status_code == 400 and message in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.execute(db.select(User.password_hash)).scalar_one() == before


def test_change_email_validates(app, client):
    with app.app_context():
        make_user("pat")
    login(client, "pat")
    token = csrf_from(client.get("/account").get_data(as_text=True))
    r = client.post("/account/email", data={"email": "not an address", "csrf_token": token})
    assert r.status_code == 400 and "Invalid email" in r.get_data(as_text=True)
    r = client.post("/account/email", data={"email": "pat@example.org", "csrf_token": token})
    assert r.status_code == 302
    with app.app_context():
        assert db.session.execute(db.select(User.email)).scalar_one() == "pat@example.org"
        assert db.session.execute(db.select(ActionLog.action).where(ActionLog.action == "email-changed")).scalar_one()


def test_disabled_user_cannot_log_in_and_is_logged_out(app):
    with app.app_context():
        make_user("boss", Role.MANAGER)
        pat = make_user("pat")
        pat_id = pat.id
    victim = app.test_client()
    login(victim, "pat")
    boss = app.test_client()
    login(boss, "boss")
    token = csrf_from(boss.get(f"/users/{pat_id}").get_data(as_text=True))
    r = boss.post(f"/users/{pat_id}", data={"role": "regular", "disabled": "y", "csrf_token": token})
    assert r.status_code == 302
    assert victim.get("/").status_code == 302
    assert login(app.test_client(), "pat").status_code == 401


def test_session_cookie_is_httponly_and_samesite(app, client):
    with app.app_context():
        make_user("pat")
    r = login(client, "pat")
    cookie = next(v for v in r.headers.getlist("Set-Cookie") if v.startswith("corral_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_next_parameter_only_redirects_inside_the_site(app, client):
    with app.app_context():
        make_user("pat")
    token = csrf_from(client.get("/login").get_data(as_text=True))
    r = client.post("/login?next=//evil.example/", data={"username": "pat", "password": PASSWORD, "csrf_token": token})
    assert r.headers["Location"] == "/"


def test_htmx_poll_after_logout_redirects_the_browser(app, client):
    r = client.get("/_summary", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/login"


def test_production_config_has_no_debugger_or_tracebacks(app_env, redis_server):
    from portal import create_app

    prod = create_app()
    assert not prod.debug and not prod.testing

    @prod.route("/boom")
    def boom():
        raise RuntimeError("secret internals")

    with prod.app_context():
        from flask_migrate import upgrade

        upgrade()
    r = prod.test_client().get("/boom")
    body = r.get_data(as_text=True)
    with prod.app_context():
        db.engine.dispose()
    assert r.status_code == 500 and "Traceback" not in body and "secret internals" not in body


def test_secret_key_is_generated_once_into_instance(tmp_path):
    from portal.config import secret_key

    first = secret_key(tmp_path)
    assert len(first) == 64 and secret_key(tmp_path) == first
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_env_overrides_parse_values(monkeypatch):
    from portal.config import env_overrides

    env = {"CORRAL_DATABASE_URL": "postgresql://x/y", "CORRAL_PAGE_SIZE": "25", "CORRAL_X": "true", "OTHER": "1"}
    assert env_overrides(env) == {"SQLALCHEMY_DATABASE_URI": "postgresql://x/y", "PAGE_SIZE": 25, "X": True}
