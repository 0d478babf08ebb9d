"""Every route x (anonymous, regular, power, manager) x (own object, someone else's).

The matrix below must name every endpoint the application registers; a new
route fails ``test_matrix_covers_every_route`` until it is added here. Each
response is also checked for data that belongs to someone else: a regular or
power user must never see the victim's VM, task, username or actions in any
page, partial or JSON document.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from portal.extensions import db
from portal.models import ActionLog, Appliance, Role, Task
from tests.conftest import PASSWORD, make_server, make_user, make_vm

ROLES = ["anon", "regular", "power", "manager"]
# What each role gets: a status code, or a dict own/other -> status code.
ANON = 302  # sent to the login page
API_ANON = 401
OWNED = {"own": 200, "other": 404}
MANAGER_ALL = {"own": 200, "other": 200}

# endpoint -> (method, url template, {role: expected}); templates use {vm}, {task}, {user}, {export}
MATRIX: dict[str, tuple[str, str, dict]] = {
    "auth.login": ("GET", "/login", {"anon": 200, "regular": 302, "power": 302, "manager": 302}),
    "auth.logout": ("POST", "/logout", {"anon": ANON, "regular": 302, "power": 302, "manager": 302}),
    "auth.account": ("GET", "/account", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "auth.change_password": ("POST", "/account/password", {"anon": ANON, "regular": 400, "power": 400, "manager": 400}),
    "auth.change_email": ("POST", "/account/email", {"anon": ANON, "regular": 400, "power": 400, "manager": 400}),
    "auth.actionlog": ("GET", "/actionlog", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "auth.actionlog_export": ("POST", "/actionlog/export", {"anon": ANON, "regular": 302, "power": 302, "manager": 302}),
    "summary.index": ("GET", "/", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "summary.panel": ("GET", "/_summary", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "servers.index": ("GET", "/servers/", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "servers.detail": ("GET", "/servers/{server}", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "servers.add": ("GET", "/servers/add", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "servers.review": ("GET", "/servers/add/{task}", {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "servers.add_disk": ("POST", "/servers/{server}/disks", {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
    "servers.mark_down": ("POST", "/servers/{server}/mark-down",
                          {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
    "servers.mark_up": ("POST", "/servers/{server}/mark-up", {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
    "servers.delete": ("POST", "/servers/{server}/delete", {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
    "servers.graphs": ("GET", "/servers/{server}/graphs", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "servers.health": ("GET", "/servers/{server}/_health", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "servers.domains": ("GET", "/servers/{server}/_domains",
                        {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "vms.index": ("GET", "/vms/", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "vms.detail": ("GET", "/vms/{vm}", {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "vms.new": ("GET", "/vms/new", {"anon": ANON, "regular": 403, "power": 200, "manager": 200}),
    "vms.new_blank": ("GET", "/vms/new-blank", {"anon": ANON, "regular": 403, "power": 200, "manager": 200}),
    "vms.power": ("POST", "/vms/{vm}/power/start",
                  {"anon": ANON, "regular": {"own": 302, "other": 404}, "power": {"own": 302, "other": 404},
                   "manager": {"own": 302, "other": 302}}),
    "vms.state": ("GET", "/vms/{vm}/_state", {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "vms.console": ("GET", "/vms/{vm}/_console",
                    {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "vms.delete": ("POST", "/vms/{vm}/delete",
                   {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                    "manager": {"own": 302, "other": 302}}),
    "vms.settings": ("POST", "/vms/{vm}/settings",
                     {"anon": ANON, "regular": {"own": 302, "other": 404}, "power": {"own": 302, "other": 404},
                      "manager": {"own": 302, "other": 302}}),
    "vms.change_owner": ("POST", "/vms/{vm}/owner",
                         {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 403, "other": 404},
                          "manager": {"own": 302, "other": 302}}),
    "vms.copy_back": ("POST", "/vms/{vm}/copy-back",
                      {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 403, "other": 404},
                       "manager": {"own": 302, "other": 302}}),
    "library.index": ("GET", "/library/", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "library.upload_appliance": ("GET", "/library/appliances/upload",
                                 {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "library.import_ova": ("GET", "/library/appliances/import-ova",
                           {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "library.catalog_page": ("GET", "/library/catalog", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "library.catalog_download": ("POST", "/library/catalog/download",
                                 {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
    "library.upload_iso": ("GET", "/library/isos/upload", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    # Appliances belong to nobody; the manager's first request deletes it, the second finds nothing.
    "library.delete_appliance": ("POST", "/library/appliances/{appliance}/delete",
                                 {"anon": ANON, "regular": 403, "power": 403, "manager": {"own": 302, "other": 404}}),
    "users.index": ("GET", "/users/", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "users.new": ("GET", "/users/new", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "users.edit": ("GET", "/users/{user}", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "users.reset_password": ("POST", "/users/{user}/reset-password",
                             {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "tasks.index": ("GET", "/tasks/", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "tasks.detail": ("GET", "/tasks/{task}", {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "tasks.status": ("GET", "/tasks/{task}/_status",
                     {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "tasks.cancel": ("POST", "/tasks/{task}/cancel",
                     {"anon": ANON, "regular": {"own": 302, "other": 404}, "power": {"own": 302, "other": 404},
                      "manager": {"own": 302, "other": 302}}),
    "tasks.download": ("GET", "/tasks/{export}/download",
                       {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "api.summary": ("GET", "/api/summary", {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api.vms": ("GET", "/api/vms", {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api.vm": ("GET", "/api/vms/{vm}", {"anon": API_ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "api.task": ("GET", "/api/tasks/{task}", {"anon": API_ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "static": ("GET", "/static/css/corral.css", {"anon": 200, "regular": 200, "power": 200, "manager": 200}),
}

# Strings that only the victim's objects contain.
VICTIM_MARKERS = ["victim", "vsecret", "victim-task-title", "victim-detail-marker"]


def _objects(app) -> dict[str, dict]:
    """Each role's own VM, task and export, plus the victim's (someone else's)."""
    out: dict[str, dict] = {}
    with app.app_context():
        server = make_server("srvmatrix")
        appliance = Appliance(name="matrix-app", state="ready")
        db.session.add(appliance)
        db.session.commit()
        out["appliance"] = appliance.id
        people = {
            "regular": make_user("reg"),
            "power": make_user("pow", Role.POWER),
            "manager": make_user("boss", Role.MANAGER),
            "victim": make_user("victim"),
        }
        exports = Path(app.instance_path) / "exports"
        exports.mkdir(parents=True, exist_ok=True)
        for role, user in people.items():
            name = "vsecret" if role == "victim" else f"{role[:3]}vm"
            vm = make_vm(user, name, server=server)
            title = "victim-task-title" if role == "victim" else f"{role} task"
            task = Task(kind="vm-start", title=title, requester_id=user.id, target_type="vm", target_id=vm.id,
                        state="running", log="")
            export = Task(kind="export-actionlog", title=f"{title} export", requester_id=user.id,
                          state="succeeded", result=f"actionlog-{role}.csv", log="")
            db.session.add_all([task, export])
            db.session.add(ActionLog(user_id=user.id, action="probe",
                                     detail="victim-detail-marker" if role == "victim" else f"{role} detail"))
            db.session.commit()
            (exports / f"actionlog-{role}.csv").write_text(f"{role} rows\n")
            out[role] = {"user": user.id, "vm": vm.id, "task": task.id, "export": export.id,
                         "server": server.id, "username": user.username}
    return out


@pytest.fixture
def matrix_app(app):
    app.config["WTF_CSRF_ENABLED"] = False  # CSRF has its own tests; this one is about authorisation
    return app


def test_matrix_covers_every_route(app):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert endpoints == set(MATRIX), (
        f"routes missing from the matrix: {sorted(endpoints - set(MATRIX))}; "
        f"stale entries: {sorted(set(MATRIX) - endpoints)}"
    )


@pytest.mark.parametrize("role", ROLES)
def test_matrix(matrix_app, role):
    app = matrix_app
    objs = _objects(app)
    failures = []
    client = app.test_client()

    def login():
        if role != "anon":
            r = client.post("/login", data={"username": objs[role]["username"], "password": PASSWORD})
            assert r.status_code == 302, f"{role} could not log in"

    login()
    for endpoint, (method, template, expected_by_role) in MATRIX.items():
        expected = expected_by_role[role]
        cases = expected.items() if isinstance(expected, dict) else [("own", expected), ("other", expected)]
        for whose, status in cases:
            if "{" not in template and whose == "other":
                continue  # routes without an object: one case is enough
            owner = objs["victim"] if whose == "other" else objs.get(role, objs["regular"])
            ids = {k: owner[k] for k in ("vm", "task", "export", "server")}
            ids["appliance"] = objs["appliance"]
            ids["user"] = objs["victim"]["user"]  # never reset the acting user's own password
            url = template.format(**ids)
            with client.open(url, method=method) as resp:
                body = resp.get_data(as_text=True)
                code = resp.status_code
            if code != status:
                failures.append(f"{role} {method} {url} ({whose}): {code} != {status}")
            if role in ("regular", "power"):
                leaked = [m for m in VICTIM_MARKERS if m in body]
                if leaked:
                    failures.append(f"{role} {method} {url} ({whose}): foreign data {leaked}")
            if endpoint == "auth.logout":
                login()
    assert not failures, "\n".join(failures)


def test_manager_sees_everyone(matrix_app, client):
    objs = _objects(matrix_app)
    client.post("/login", data={"username": "boss", "password": PASSWORD})
    body = client.get("/vms/").get_data(as_text=True)
    assert "vsecret" in body and "regvm" in body and "powvm" in body
    assert client.get("/api/vms").get_json()["total"] == 4
    assert "victim-task-title" in client.get("/tasks/").get_data(as_text=True)
    assert "victim-detail-marker" in client.get("/actionlog").get_data(as_text=True)
    assert "victim-detail-marker" in client.get(f"/actionlog?user={objs['victim']['user']}").get_data(as_text=True)


def test_regular_user_counts_only_own_vms(matrix_app, client):
    _objects(matrix_app)
    client.post("/login", data={"username": "reg", "password": PASSWORD})
    summary = client.get("/api/summary").get_json()
    assert summary["vms_total"] == 1
    assert client.get("/api/vms").get_json()["total"] == 1
    # A regular user cannot widen the action log filter to someone else.
    body = client.get("/actionlog?user=4").get_data(as_text=True)
    assert "victim-detail-marker" not in body
