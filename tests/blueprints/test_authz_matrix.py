"""Every route x (anonymous, regular, power, manager) x (own object, someone else's).

The matrix below must name every endpoint the application registers; a new
route fails ``test_matrix_covers_every_route`` until it is added here. Each
response is also checked for data that belongs to someone else: a regular or
power user must never see the victim's VM, task, username or actions in any
page, partial or JSON document.
"""

from __future__ import annotations

import pytest

from portal.extensions import db
from portal.models import ActionLog, Appliance, Role, Task, User, VirtualCluster
from portal.shared import shared_dir
from tests.conftest import PASSWORD, make_server, make_user, make_vm

ROLES = ["anon", "regular", "power", "manager"]
# What each role gets: a status code, or a dict own/other -> status code.
ANON = 302  # sent to the login page
API_ANON = 401
OWNED = {"own": 200, "other": 404}
MANAGER_ALL = {"own": 200, "other": 200}

# endpoint -> (method, url template, {role: expected}); templates use {vm}, {task}, {user}, {export}, {cluster}
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
    "servers.declare_shared": ("POST", "/servers/{server}/disks/0/shared",
                               {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "servers.evacuate": ("POST", "/servers/{server}/evacuate", {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
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
    # Resizing is a manager's or a power user's action; a regular owner only operates.
    "vms.settings": ("POST", "/vms/{vm}/settings",
                     {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                      "manager": {"own": 302, "other": 302}}),
    "vms.change_owner": ("POST", "/vms/{vm}/owner",
                         {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 403, "other": 404},
                          "manager": {"own": 302, "other": 302}}),
    "vms.copy_back": ("POST", "/vms/{vm}/copy-back",
                      {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 403, "other": 404},
                       "manager": {"own": 302, "other": 302}}),
    # LiveSync: protection is a settings change; fail back and "make primary" are moves (bad state: 302 + message).
    "livesync.protection": ("POST", "/vms/{vm}/protection",
                            {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                             "manager": {"own": 302, "other": 302}}),
    "livesync.failback": ("POST", "/vms/{vm}/failback",
                          {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                           "manager": {"own": 302, "other": 302}}),
    # The operator's Power on on the backup is a power action (owner or manager); an unprotected VM is
    # refused with a message after authorisation.
    "livesync.power_on_backup": ("POST", "/vms/{vm}/power-on-backup",
                                 {"anon": ANON, "regular": {"own": 302, "other": 404},
                                  "power": {"own": 302, "other": 404}, "manager": {"own": 302, "other": 302}}),
    "livesync.make_primary": ("POST", "/vms/{vm}/make-primary",
                              {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                               "manager": {"own": 302, "other": 302}}),
    # The web console: owners and managers; a token only for a running VM (the matrix's VMs are not: 409).
    "console.page": ("GET", "/vms/{vm}/console/vnc",
                     {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "console.token": ("POST", "/vms/{vm}/console/vnc/token",
                      {"anon": ANON, "regular": {"own": 409, "other": 404}, "power": {"own": 409, "other": 404},
                       "manager": {"own": 409, "other": 409}}),
    "moves.page": ("GET", "/vms/{vm}/move",
                   {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": OWNED, "manager": MANAGER_ALL}),
    # No mode chosen: the form answers with the page again (303), after authorisation.
    "moves.submit": ("POST", "/vms/{vm}/move",
                     {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 303, "other": 404},
                      "manager": {"own": 303, "other": 303}}),
    # Backups: the owner (any role) and managers back up; restore and delete are for power owners and
    # managers. Backup 999999 does not exist: authorised requests reach the 404 of the backup lookup.
    "backups.index": ("GET", "/vms/{vm}/backups/",
                      {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "backups.create": ("POST", "/vms/{vm}/backups/new",
                       {"anon": ANON, "regular": {"own": 302, "other": 404}, "power": {"own": 302, "other": 404},
                        "manager": {"own": 302, "other": 302}}),
    "backups.restore": ("POST", "/vms/{vm}/backups/999999/restore",
                        {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 404, "other": 404},
                         "manager": {"own": 404, "other": 404}}),
    "backups.delete": ("POST", "/vms/{vm}/backups/999999/delete",
                       {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 404, "other": 404},
                        "manager": {"own": 404, "other": 404}}),
    "backups.copy_to_library": ("POST", "/vms/{vm}/backups/999999/copy-to-library",
                                {"anon": ANON, "regular": {"own": 403, "other": 404},
                                 "power": {"own": 403, "other": 404}, "manager": {"own": 404, "other": 404}}),
    # Schedules commit disk space: power owners and managers (an empty form is refused after authorisation).
    "backups.schedule": ("POST", "/vms/{vm}/backups/schedule",
                         {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
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
    "api.running_moves": ("GET", "/api/moves", {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    # Usage reports: everyone sees their own (a manager anyone's); price sheets are the managers'.
    "metering.report": ("GET", "/usage/", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "metering.report_csv": ("GET", "/usage/report.csv", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "metering.invoice": ("GET", "/usage/invoice", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "metering.prices": ("GET", "/usage/prices", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "metering.add_price": ("POST", "/usage/prices", {"anon": ANON, "regular": 403, "power": 403, "manager": 400}),
    "metering.delete_price": ("POST", "/usage/prices/999999/delete",
                              {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    # The catalog: everyone browses; managers publish (an empty form is refused after authorisation).
    "offerings.index": ("GET", "/catalog/", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "offerings.new": ("GET", "/catalog/new", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "offerings.edit": ("GET", "/catalog/999999/edit", {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "offerings.delete": ("POST", "/catalog/999999/delete", {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "networks.index": ("GET", "/networks/", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "networks.create": ("POST", "/networks/", {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
    "networks.reserve": ("POST", "/networks/999999/reservations",
                         {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "networks.delete": ("POST", "/networks/999999/delete", {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "networks.vm_nics": ("POST", "/networks/vm/{vm}", {"anon": ANON, "regular": {"own": 403, "other": 404},
                                                       "power": {"own": 302, "other": 404},
                                                       "manager": {"own": 302, "other": 302}}),
    "license_keys.index": ("GET", "/license-keys/", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "license_keys.add": ("POST", "/license-keys/999999", {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "license_keys.not_required": ("POST", "/license-keys/999999/not-required",
                                  {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "license_keys.delete": ("POST", "/license-keys/key/999999/delete",
                            {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    # Attributes: global, appliance and OS-type ones are the managers' (a form without a scope: 400 after
    # authorisation); a VM's own are set by managers and power owners, as its settings.
    "attributes.index": ("GET", "/attributes/", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    # (the matrix's appliance is deleted above: an authorised request reaches the lookup's 404)
    "attributes.appliance": ("GET", "/attributes/appliances/999999",
                             {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "attributes.appliance_settings": ("POST", "/attributes/appliances/999999/settings",
                                      {"anon": ANON, "regular": 403, "power": 403, "manager": 404}),
    "attributes.os_type": ("GET", "/attributes/os/debian12", {"anon": ANON, "regular": 403, "power": 403,
                                                             "manager": 200}),
    "attributes.set_attr": ("POST", "/attributes/set", {"anon": ANON, "regular": 403, "power": 403, "manager": 400}),
    "attributes.unset_attr": ("POST", "/attributes/unset", {"anon": ANON, "regular": 403, "power": 403,
                                                            "manager": 400}),
    "attributes.vm_set": ("POST", "/attributes/vm/{vm}",
                          {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                           "manager": {"own": 302, "other": 302}}),
    "attributes.vm_unset": ("POST", "/attributes/vm/{vm}/unset",
                            {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                             "manager": {"own": 302, "other": 302}}),
    # Virtual clusters: seen by owners and managers; power actions for who sees one (the matrix's clusters
    # have no VMs: "nothing to start" after authorisation); adding, removing and deleting for managers and
    # power owners (no count: refused after authorisation; no such compute: 404).
    "clusters.index": ("GET", "/clusters/", {"anon": ANON, "regular": 200, "power": 200, "manager": 200}),
    "clusters.new": ("GET", "/clusters/new", {"anon": ANON, "regular": 403, "power": 200, "manager": 200}),
    "clusters.detail": ("GET", "/clusters/{cluster}",
                        {"anon": ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "clusters.power": ("POST", "/clusters/{cluster}/power/start",
                       {"anon": ANON, "regular": {"own": 302, "other": 404}, "power": {"own": 302, "other": 404},
                        "manager": {"own": 302, "other": 302}}),
    "clusters.add_computes": ("POST", "/clusters/{cluster}/computes",
                              {"anon": ANON, "regular": {"own": 403, "other": 404},
                               "power": {"own": 302, "other": 404}, "manager": {"own": 302, "other": 302}}),
    "clusters.remove_compute": ("POST", "/clusters/{cluster}/computes/999999/remove",
                                {"anon": ANON, "regular": {"own": 403, "other": 404},
                                 "power": {"own": 404, "other": 404}, "manager": {"own": 404, "other": 404}}),
    "clusters.delete": ("POST", "/clusters/{cluster}/delete",
                        {"anon": ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 302, "other": 404},
                         "manager": {"own": 302, "other": 302}}),
    # Rebalancing is the managers' (an empty approval is refused after authorisation).
    "rebalance.index": ("GET", "/rebalance/", {"anon": ANON, "regular": 403, "power": 403, "manager": 200}),
    "rebalance.apply": ("POST", "/rebalance/apply", {"anon": ANON, "regular": 403, "power": 403, "manager": 302}),
    "static": ("GET", "/static/css/corral.css", {"anon": 200, "regular": 200, "power": 200, "manager": 200}),
    # API tokens on the Account page: everyone has their own (an empty name is refused after authorisation).
    "tokens.create": ("POST", "/account/tokens/", {"anon": ANON, "regular": 302, "power": 302, "manager": 302}),
    # Prometheus scrapes without a login: allowed by address (loopback by default) or METRICS_TOKEN.
    "metrics.scrape": ("GET", "/metrics", {"anon": 200, "regular": 200, "power": 200, "manager": 200}),
    "tokens.revoke": ("POST", "/account/tokens/999999/revoke",
                      {"anon": ANON, "regular": 303, "power": 303, "manager": 303}),
}

# The JSON API v1, called with each role's read-write token (anon: no token). endpoint -> (method, url, JSON
# body, {role: expected}). Bodies are valid, so what answers is authorisation, then the domain's rule.
OWN_202 = {"own": 202, "other": 404}
API_MATRIX: dict[str, tuple[str, str, dict | None, dict]] = {
    "api_v1.me": ("GET", "/api/v1/me", None, {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    # Usage reports (own; a manager's: everyone's), the catalog, the rebalancing proposal (managers).
    "api_v1.usage_report": ("GET", "/api/v1/usage", None,
                            {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.list_offerings": ("GET", "/api/v1/offerings", None,
                              {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.rebalance_proposal": ("GET", "/api/v1/rebalance", None,
                                  {"anon": API_ANON, "regular": 403, "power": 403, "manager": 200}),
    "api_v1.openapi_json": ("GET", "/api/v1/openapi.json", None,
                            {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.docs": ("GET", "/api/v1/docs", None, {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.list_vms": ("GET", "/api/v1/vms", None, {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.get_vm": ("GET", "/api/v1/vms/{vm}", None,
                      {"anon": API_ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    # No such appliance or ISO: those who may create reach the 422 of the lookup.
    "api_v1.create_vm": ("POST", "/api/v1/vms", {"name": "mx", "appliance_id": 999999, "memory_mb": 512},
                         {"anon": API_ANON, "regular": 403, "power": 422, "manager": 422}),
    "api_v1.create_blank_vm": ("POST", "/api/v1/vms/blank", {"name": "mx", "iso_id": 999999},
                               {"anon": API_ANON, "regular": 403, "power": 422, "manager": 422}),
    "api_v1.power_vm": ("POST", "/api/v1/vms/{vm}/power", {"action": "start"},
                        {"anon": API_ANON, "regular": OWN_202, "power": OWN_202, "manager": {"own": 202, "other": 202}}),
    "api_v1.change_settings": ("PATCH", "/api/v1/vms/{vm}", {"vcpus": 2},
                               {"anon": API_ANON, "regular": {"own": 403, "other": 404}, "power": OWN_202,
                                "manager": {"own": 202, "other": 202}}),
    # The VMs have no server disk: the backup rule refuses (409) once authorised.
    "api_v1.back_up_vm": ("POST", "/api/v1/vms/{vm}/backups", None,
                          {"anon": API_ANON, "regular": {"own": 409, "other": 404}, "power": {"own": 409, "other": 404},
                           "manager": {"own": 409, "other": 409}}),
    "api_v1.move_vm": ("POST", "/api/v1/vms/{vm}/move", {"mode": "cold", "server_id": 999999},
                       {"anon": API_ANON, "regular": {"own": 403, "other": 404}, "power": {"own": 409, "other": 404},
                        "manager": {"own": 409, "other": 409}}),
    "api_v1.change_owner": ("PUT", "/api/v1/vms/{vm}/owner", {"owner": "reg"},
                            {"anon": API_ANON, "regular": {"own": 403, "other": 404},
                             "power": {"own": 403, "other": 404}, "manager": {"own": 200, "other": 200}}),
    "api_v1.delete_vm": ("DELETE", "/api/v1/vms/{vm}", None,
                         {"anon": API_ANON, "regular": {"own": 403, "other": 404}, "power": OWN_202,
                          "manager": {"own": 202, "other": 202}}),
    "api_v1.list_servers": ("GET", "/api/v1/servers", None,
                            {"anon": API_ANON, "regular": 403, "power": 403, "manager": 200}),
    "api_v1.get_server": ("GET", "/api/v1/servers/{server}", None,
                          {"anon": API_ANON, "regular": 403, "power": 403, "manager": 200}),
    # One server: the second request finds it marked down (up) already.
    "api_v1.mark_server_down": ("POST", "/api/v1/servers/{server}/mark-down", None,
                                {"anon": API_ANON, "regular": 403, "power": 403, "manager": {"own": 200, "other": 409}}),
    "api_v1.mark_server_up": ("POST", "/api/v1/servers/{server}/mark-up", None,
                              {"anon": API_ANON, "regular": 403, "power": 403, "manager": {"own": 200, "other": 409}}),
    "api_v1.list_appliances": ("GET", "/api/v1/library/appliances", None,
                               {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.list_isos": ("GET", "/api/v1/library/isos", None,
                         {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    # An empty upload is refused after authorisation (422).
    "api_v1.upload_appliance": ("POST", "/api/v1/library/appliances", None,
                                {"anon": API_ANON, "regular": 403, "power": 403, "manager": 422}),
    "api_v1.import_ova": ("POST", "/api/v1/library/appliances/ova", None,
                          {"anon": API_ANON, "regular": 403, "power": 403, "manager": 422}),
    # Networks and the license key pool are the managers' (999999: authorised requests reach the lookup's 404).
    "api_v1.list_networks": ("GET", "/api/v1/networks", None,
                             {"anon": API_ANON, "regular": 403, "power": 403, "manager": 200}),
    "api_v1.get_network": ("GET", "/api/v1/networks/999999", None,
                           {"anon": API_ANON, "regular": 403, "power": 403, "manager": 404}),
    "api_v1.list_license_keys": ("GET", "/api/v1/license-keys?appliance=999999", None,
                                 {"anon": API_ANON, "regular": 403, "power": 403, "manager": 404}),
    "api_v1.add_license_keys": ("POST", "/api/v1/license-keys", {"appliance_id": 999999, "keys": ["K-1"]},
                                {"anon": API_ANON, "regular": 403, "power": 403, "manager": 404}),
    # Attributes: a VM's list for who sees it, its own set/unset as its settings; the other scopes are the
    # managers' (unsetting what is not set: 404 after authorisation).
    "api_v1.list_vm_attributes": ("GET", "/api/v1/vms/{vm}/attributes", None,
                                  {"anon": API_ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "api_v1.set_vm_attribute": ("PUT", "/api/v1/vms/{vm}/attributes", {"key": "corral_motd", "value": "hi"},
                                {"anon": API_ANON, "regular": {"own": 403, "other": 404},
                                 "power": {"own": 200, "other": 404}, "manager": MANAGER_ALL}),
    "api_v1.unset_vm_attribute": ("DELETE", "/api/v1/vms/{vm}/attributes?key=nosuch", None,
                                  {"anon": API_ANON, "regular": {"own": 403, "other": 404},
                                   "power": {"own": 404, "other": 404}, "manager": {"own": 404, "other": 404}}),
    "api_v1.list_attributes": ("GET", "/api/v1/attributes?scope=global", None,
                               {"anon": API_ANON, "regular": 403, "power": 403, "manager": 200}),
    "api_v1.set_attribute": ("PUT", "/api/v1/attributes", {"scope": "global", "key": "corral_motd", "value": "hi"},
                             {"anon": API_ANON, "regular": 403, "power": 403, "manager": 200}),
    "api_v1.unset_attribute": ("DELETE", "/api/v1/attributes?scope=global&key=nosuch", None,
                               {"anon": API_ANON, "regular": 403, "power": 403, "manager": 404}),
    "api_v1.set_appliance_cloud_init": ("PUT", "/api/v1/library/appliances/999999/cloud-init", {"cloud_init": True},
                                        {"anon": API_ANON, "regular": 403, "power": 403, "manager": 404}),
    # Virtual clusters (as their pages; no such appliance: 422 once authorised; no VMs: nothing to start).
    "api_v1.list_clusters": ("GET", "/api/v1/clusters", None,
                             {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.get_cluster": ("GET", "/api/v1/clusters/{cluster}", None,
                           {"anon": API_ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "api_v1.create_cluster": ("POST", "/api/v1/clusters",
                              {"fqdn": "mx.example.org", "public_ip": "10.9.9.9", "computes": 1, "appliance_id": 999999,
                               "frontend": {"memory_mb": 256}, "compute": {"memory_mb": 128}},
                              {"anon": API_ANON, "regular": 403, "power": 422, "manager": 422}),
    "api_v1.delete_cluster": ("DELETE", "/api/v1/clusters/{cluster}", None,
                              {"anon": API_ANON, "regular": {"own": 403, "other": 404}, "power": OWN_202,
                               "manager": {"own": 202, "other": 202}}),
    "api_v1.cluster_action": ("POST", "/api/v1/clusters/{cluster}/actions", {"action": "start"},
                              {"anon": API_ANON, "regular": {"own": 409, "other": 404},
                               "power": {"own": 409, "other": 404}, "manager": {"own": 409, "other": 409}}),
    "api_v1.list_users": ("GET", "/api/v1/users", None, {"anon": API_ANON, "regular": 403, "power": 403, "manager": 200}),
    "api_v1.list_tasks": ("GET", "/api/v1/tasks", None, {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
    "api_v1.get_task": ("GET", "/api/v1/tasks/{task}", None,
                        {"anon": API_ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "api_v1.cancel_task": ("POST", "/api/v1/tasks/{task}/cancel", None,
                           {"anon": API_ANON, "regular": OWNED, "power": OWNED, "manager": MANAGER_ALL}),
    "api_v1.list_actionlog": ("GET", "/api/v1/actionlog", None,
                              {"anon": API_ANON, "regular": 200, "power": 200, "manager": 200}),
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
        exports = shared_dir("exports")
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
            cluster = VirtualCluster(name=f"{name}.cluster.test", public_ip=f"10.77.0.{len(out)}", owner_id=user.id,
                                     vlan=3000 + len(out), compute_memory_mb=128, compute_disk_gb=1)
            db.session.add(cluster)
            db.session.commit()
            out[role] = {"user": user.id, "vm": vm.id, "task": task.id, "export": export.id,
                         "server": server.id, "username": user.username, "cluster": cluster.id}
    return out


@pytest.fixture
def matrix_app(app):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True  # CSRF has its own tests; this one is about authorisation
    return app


def test_matrix_covers_every_route(app):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    named = set(MATRIX) | set(API_MATRIX)
    assert endpoints == named, (
        f"routes missing from the matrix: {sorted(endpoints - named)}; "
        f"stale entries: {sorted(named - endpoints)}"
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
            ids = {k: owner[k] for k in ("vm", "task", "export", "server", "cluster")}
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


def _release_task_keys(app) -> None:
    """Let the next request on the same VM start its own task (one active task per VM is another test's rule)."""
    with app.app_context():
        db.session.execute(db.update(Task).where(Task.active_key.is_not(None)).values(active_key=None))
        db.session.commit()


@pytest.mark.parametrize("role", ROLES)
def test_api_matrix_with_tokens(matrix_app, role):
    from portal import api_tokens

    app = matrix_app
    objs = _objects(app)
    headers, read_only = {}, {}
    if role != "anon":
        with app.app_context():
            user = db.session.get(User, objs[role]["user"])
            rw = api_tokens.create(user, name="rw", scope="write", expires_in_days=None)[1]
            ro = api_tokens.create(user, name="ro", scope="read", expires_in_days=None)[1]
            headers, read_only = {"Authorization": f"Bearer {rw}"}, {"Authorization": f"Bearer {ro}"}
            db.session.commit()
    client = app.test_client()
    failures = []
    for endpoint, (method, template, body, expected_by_role) in API_MATRIX.items():
        expected = expected_by_role[role]
        cases = expected.items() if isinstance(expected, dict) else [("own", expected), ("other", expected)]
        for whose, status in cases:
            if "{" not in template and whose == "other":
                continue
            owner = objs["victim"] if whose == "other" else objs.get(role, objs["regular"])
            url = template.format(**{k: owner[k] for k in ("vm", "task", "server", "cluster")})
            if role != "anon" and method != "GET":  # a read-only token changes nothing anywhere
                resp = client.open(url, method=method, json=body, headers=read_only)
                if resp.status_code != 403 or resp.get_json()["error"]["code"] != "read_only_token":
                    failures.append(f"{role} read-only {method} {url}: {resp.status_code}")
            resp = client.open(url, method=method, json=body, headers=headers)
            _release_task_keys(app)
            if resp.status_code != status:
                failures.append(f"{role} {method} {url} ({whose}): {resp.status_code} != {status} "
                                f"{resp.get_data(as_text=True)[:200]}")
            if endpoint != "api_v1.docs" and not resp.is_json:
                failures.append(f"{role} {method} {url}: not JSON")
            if role in ("regular", "power"):
                leaked = [m for m in VICTIM_MARKERS if m in resp.get_data(as_text=True)]
                if leaked:
                    failures.append(f"{role} {method} {url} ({whose}): foreign data {leaked}")
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
