"""``corral-cli``: the operators' Rocks-style verbs over the JSON API v1 of a (remote) portal.

Configured by ``CORRAL_URL`` and ``CORRAL_TOKEN``, or ``~/.config/corral/config``::

    [corral]
    url = https://corral.example.org
    token = corral_…

Verbs (``corral-cli --help``)::

    list host
    list host vm [HOST] [status=y]
    set host vm NAME [mem=MB] [cpus=N] [disksize=GB]
    start|stop|shutdown|reboot|pause|resume|save|restore host vm NAME
    move host vm NAME TARGET
    remove host vm NAME
    list network
    list vmkey APPLIANCE
    add vmkey APPLIANCE KEY [KEY ...]
    list host attr NAME
    set host attr NAME KEY=VALUE
    remove host attr NAME KEY
    list|set|remove attr, appliance attr APPLIANCE, os attr OS (managers; as for host attr)
    list cluster [status=y]
    add cluster FQDN IP N [appliance=A] [mem=MB] [cpus=N] [disk=GB] [fe-mem=MB] [fe-cpus=N] [fe-disk=GB]
                [servers=H1,H2] [vlan=V] [public=NETWORK] [uplink=NIC] [clone=n]
    start|stop|shutdown|remove cluster NAME

Tables are aligned like Rocks' listings; ``--json`` prints the API's documents. Long operations
show a progress bar and wait for their task (``--no-wait``: print it and return).

Exit codes: 0 done; 1 refused by the portal (state, permission, validation); 2 usage;
3 the task failed or was cancelled; 4 no or bad configuration/token; 5 portal unreachable or broken.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import sys
from pathlib import Path

import requests

OK, REFUSED, USAGE, TASK_FAILED, AUTH, UNREACHABLE = 0, 1, 2, 3, 4, 5
# Rocks verb -> the portal's power action (Rocks' "stop" pulls the plug; "shutdown" asks the guest).
POWER_VERBS = {"start": "start", "stop": "poweroff", "shutdown": "shutdown", "reboot": "reboot", "pause": "pause",
               "resume": "resume", "save": "save", "restore": "restore"}
USAGE_TEXT = """corral-cli [--json] [--no-wait] VERB ...
  list host
  list host vm [HOST] [status=y]
  set host vm NAME [mem=MB] [cpus=N] [disksize=GB]
  start|stop|shutdown|reboot|pause|resume|save|restore host vm NAME
  move host vm NAME TARGET      (TARGET: a server's hostname, or its id)
  remove host vm NAME
  list network
  list vmkey APPLIANCE          (APPLIANCE: its name, or its id)
  add vmkey APPLIANCE KEY [KEY ...]
  list host attr NAME           (the VM's resolved attributes; SOURCE G global, A appliance, O OS, H the VM)
  set host attr NAME KEY=VALUE
  remove host attr NAME KEY
  list attr | set attr KEY=VALUE | remove attr KEY               (global; managers)
  list|set|remove appliance attr APPLIANCE [KEY=VALUE|KEY]       (managers)
  list|set|remove os attr OS [KEY=VALUE|KEY]                     (managers)
  list cluster [status=y]
  add cluster FQDN IP N [appliance=A] [mem=MB] [cpus=N] [disk=GB] [fe-mem=MB] [fe-cpus=N] [fe-disk=GB]
              [servers=H1,H2] [vlan=V] [public=NETWORK] [uplink=NIC] [clone=n]
  start|stop|shutdown|remove cluster NAME   (NAME: the FQDN or its first label)"""
CLUSTER_OPTIONS = {"appliance", "mem", "cpus", "disk", "fe-mem", "fe-cpus", "fe-disk", "servers", "vlan", "public",
                   "uplink", "clone"}


class CliError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "corral" / "config"


def load_config(url: str | None, token: str | None) -> tuple[str, str]:
    parser = configparser.ConfigParser()
    parser.read(config_path())
    section = parser["corral"] if parser.has_section("corral") else {}
    url = url or os.environ.get("CORRAL_URL") or section.get("url")
    token = token or os.environ.get("CORRAL_TOKEN") or section.get("token")
    if not url or not token:
        raise CliError(AUTH, f"Set CORRAL_URL and CORRAL_TOKEN, or url and token under [corral] in {config_path()} "
                             "(a token comes from the portal's Account page).")
    return url.rstrip("/"), token


class Client:
    def __init__(self, url: str, token: str, timeout: float = 60):
        self.base = f"{url}/api/v1"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None, **params) -> dict:
        try:
            resp = self.session.request(method, self.base + path, json=body, params=params or None,
                                        timeout=self.timeout)
        except requests.RequestException as exc:
            raise CliError(UNREACHABLE, f"Cannot reach the portal at {self.base}: {exc}") from exc
        try:
            data = resp.json()
        except ValueError:
            raise CliError(UNREACHABLE, f"The portal answered {resp.status_code} without JSON.") from None
        if resp.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            message = err.get("message", resp.reason)
            if err.get("fields"):
                message += " (" + "; ".join(f"{k}: {', '.join(v)}" for k, v in err["fields"].items()) + ")"
            code = AUTH if resp.status_code == 401 else UNREACHABLE if resp.status_code >= 500 else REFUSED
            raise CliError(code, f"{message} [{err.get('code', resp.status_code)}]")
        return data

    def all(self, path: str, **params) -> list[dict]:
        items, cursor = [], None
        while True:
            page = self.call("GET", path, limit=200, **params, **({"cursor": cursor} if cursor else {}))
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    def vm(self, name: str) -> dict:
        found = [v for v in self.all("/vms", q=name) if v["name"].lower() == name.lower()]
        if not found:
            raise CliError(REFUSED, f"No VM called {name} that you may see.")
        return found[0]

    def appliance(self, name: str) -> dict:
        if name.isdigit():
            return {"id": int(name), "name": name}
        found = [a for a in self.all("/library/appliances") if a["name"] == name]
        if not found:
            raise CliError(REFUSED, f"No appliance called {name}.")
        return found[0]

    def server(self, hostname: str) -> dict:
        """A server by hostname (listing servers is the managers'); others may name it by its id."""
        if hostname.isdigit():
            return {"id": int(hostname), "hostname": hostname}
        found = [s for s in self.all("/servers") if s["hostname"] == hostname]
        if not found:
            raise CliError(REFUSED, f"No VM server called {hostname}.")
        return found[0]


def table(header: list[str], rows: list[list]) -> str:
    """Columns left-aligned to their widest cell, one space apart, like Rocks' listings."""
    cells = [header] + [["-----" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(" ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def host_table(servers: list[dict]) -> str:
    return table(["HOST", "STATUS", "CPUS", "MEM", "FREE-MEM", "VMS", "ADDRESS"],
                 [[f"{s['hostname']}:", s["status"], s["cpus"], s["memory_mb"], s["free_memory_mb"], s["vm_count"],
                   s["address"]] for s in servers])


def vm_table(vms: list[dict], status: bool) -> str:
    header = ["VM-HOST", "VMID", "MEM", "CPUS", "DISK", "MAC", "HOST"] + (["STATUS"] if status else [])
    rows = []
    for v in vms:
        macs = v["macs"] or [None]
        rows.append([f"{v['name']}:", v["vmid"], v["memory_mb"], v["vcpus"], v["disk_gb"], macs[0], v["server"]]
                    + ([v["state"]] if status else []))
        rows += [[f"{v['name']}:", None, None, None, None, mac, None] + ([None] if status else []) for mac in macs[1:]]
    return table(header, rows)


def network_table(nets: list[dict]) -> str:
    return table(["NETWORK", "KIND", "VLAN", "SUBNET", "UPLINK", "VMS"],
                 [[f"{n['name']}:", n["kind"], n["vlan"], n["cidr"], n["uplink"], len(n["vms"])] for n in nets])


def cluster_table(clusters: list[dict], status: bool) -> str:
    """Rocks' ``list cluster``: each frontend, then its client nodes, with where each runs (and its state)."""
    rows = []
    for c in clusters:
        for vm in c["vms"]:
            first = vm["role"] == "frontend"
            rows.append([f"{c['name']}:" if first else f"{'-' * len(c['name'])}:", None if first else vm["name"],
                         "VM", vm["server"], vm["macs"][0] if vm["macs"] else None] + ([vm["state"]] if status else []))
        if not c["vms"]:
            rows.append([f"{c['name']}:", None, "VM", None, None] + ([c["state"]] if status else []))
    return table(["FRONTEND", "CLIENT NODES", "TYPE", "HOST", "MAC"] + (["STATUS"] if status else []), rows)


def cluster_body(client: Client, fqdn: str, ip: str, n: str, kv: dict[str, str]) -> dict:
    """``add cluster``'s request: sizes default to the appliance's smallest memory, as Rocks' defaults are small."""
    if not n.isdigit():
        raise CliError(USAGE, f"N (the number of computes) is a whole number, not {n!r}.")
    if "appliance" in kv:
        appliance = client.appliance(kv["appliance"])
    else:
        ready = [a for a in client.all("/library/appliances") if a.get("state", "ready") == "ready"]
        if len(ready) != 1:
            raise CliError(USAGE, "Name the appliance: appliance=NAME (the library has "
                                  f"{len(ready)} ready appliances).")
        appliance = ready[0]
    low = appliance.get("min_memory_mb", 512)

    def sizing(prefix: str) -> dict:
        out = {"memory_mb": whole(kv.get(f"{prefix}mem", str(low)), f"{prefix}mem"),
               "vcpus": whole(kv.get(f"{prefix}cpus", "1"), f"{prefix}cpus")}
        if f"{prefix}disk" in kv:
            out["disk_gb"] = whole(kv[f"{prefix}disk"], f"{prefix}disk")
        return out

    body = {"fqdn": fqdn, "public_ip": ip, "computes": int(n), "appliance_id": appliance["id"],
            "frontend": sizing("fe-"), "compute": sizing(""), "clone": kv.get("clone", "y").lower() in ("y", "yes")}
    if kv.get("servers"):
        body["server_ids"] = [client.server(h)["id"] for h in kv["servers"].split(",") if h]
    if kv.get("vlan"):
        body["vlan"] = whole(kv["vlan"], "vlan")
    if kv.get("public"):
        found = [net for net in client.call("GET", "/networks")["items"] if net["name"] == kv["public"]]
        if not found:
            raise CliError(REFUSED, f"No network called {kv['public']}.")
        body["public_network_id"] = found[0]["id"]
    if kv.get("uplink"):
        body["uplink"] = kv["uplink"]
    return body


def find_cluster(client: Client, name: str) -> dict:
    name = name.lower().rstrip(".")
    found = [c for c in client.call("GET", "/clusters")["items"] if name in (c["name"], c["name"].split(".")[0])]
    if not found:
        raise CliError(REFUSED, f"No virtual cluster called {name} that you may see.")
    return found[0]


def key_table(pool: dict) -> str:
    return table(["KEY", "VM"], [[k["key"], k["vm"]] for k in pool["keys"]])


def attr_table(kind: str, owner: str | None, items: list[dict]) -> str:
    rows = [[a["key"], a["value"].replace("\n", "\\n"), a["source"]] for a in items]
    if owner is None:
        return table(["ATTR", "VALUE", "SOURCE"], rows)
    return table([kind.upper(), "ATTR", "VALUE", "SOURCE"], [[f"{owner}:", *row] for row in rows])


def attr_verb(args: argparse.Namespace, client: Client, verb: str, kind: str, name: str | None,
              rest: list[str]) -> int:
    """Rocks' ``list|set|remove [host|appliance|os] attr``: a VM's own (resolved when listed), or a
    global, appliance or OS-type attribute."""
    if kind == "host":
        path, scope = f"/vms/{client.vm(name)['id']}/attributes", {}
    else:
        target = str(client.appliance(name)["id"]) if kind == "appliance" else (name or "")
        path, scope = "/attributes", {"scope": kind, "target": target}
    if verb == "list" and not rest:
        doc = client.call("GET", path, **scope)
    elif verb == "set" and len(rest) == 1 and "=" in rest[0]:
        key, _, value = rest[0].partition("=")
        doc = client.call("PUT", path, {**scope, "key": key, "value": value})
    elif verb == "remove" and len(rest) == 1:
        doc = client.call("DELETE", path, key=rest[0], **scope)
    else:
        where = "attr " if kind == "global" else f"{kind} attr {kind.upper()} "
        raise CliError(USAGE, f"list {where.strip()} | set {where}KEY=VALUE | remove {where}KEY")
    print(json.dumps(doc, indent=2) if args.json else attr_table(kind, name, doc["items"]))
    return OK


def options(words: list[str], allowed: set[str]) -> tuple[list[str], dict[str, str]]:
    plain, kv = [], {}
    for w in words:
        if "=" in w:
            key, _, value = w.partition("=")
            if key not in allowed:
                raise CliError(USAGE, f"Unknown option {key}= (known: {', '.join(sorted(allowed)) or 'none'}).")
            kv[key] = value
        else:
            plain.append(w)
    return plain, kv


def whole(value: str, name: str) -> int:
    if not value.isdigit():
        raise CliError(USAGE, f"{name}= takes a whole number, not {value!r}.")
    return int(value)


def wait_for(client: Client, accepted: dict, *, show: bool) -> dict:
    """Follow a task to its end (long-polling), with a progress bar on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    task = accepted["task"]
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[step]}"), TimeElapsedColumn(), console=console,
                  disable=not (show and console.is_terminal)) as bar:
        row = bar.add_task(task["title"], total=100, step="")
        while task["state"] in ("queued", "running"):
            task = client.call("GET", f"/tasks/{task['id']}", wait=10)
            bar.update(row, completed=task["pct"] or 0, step=task["step"] or task["state"])
    return task


def run(args: argparse.Namespace, client: Client) -> int:
    words = args.words
    out = sys.stdout
    if words[:2] == ["list", "host"] and len(words) == 2:
        servers = client.all("/servers")
        print(json.dumps(servers, indent=2) if args.json else host_table(servers), file=out)
        return OK
    if words[:3] == ["list", "host", "vm"]:
        plain, kv = options(words[3:], {"status"})
        if len(plain) > 1:
            raise CliError(USAGE, "list host vm [HOST] [status=y]")
        vms = client.all("/vms", **({"server": plain[0]} if plain else {}))
        vms.sort(key=lambda v: v["name"])
        status = kv.get("status", "n").lower() in ("y", "yes", "true", "1")
        print(json.dumps(vms, indent=2) if args.json else vm_table(vms, status), file=out)
        return OK
    if words == ["list", "network"]:
        nets = client.call("GET", "/networks")["items"]
        print(json.dumps(nets, indent=2) if args.json else network_table(nets), file=out)
        return OK
    if words[:2] == ["list", "vmkey"] and len(words) == 3:
        pool = client.call("GET", "/license-keys", appliance=client.appliance(words[2])["id"])
        print(json.dumps(pool, indent=2) if args.json else key_table(pool), file=out)
        return OK
    if words[:2] == ["add", "vmkey"] and len(words) >= 4:
        pool = client.call("POST", "/license-keys", {"appliance_id": client.appliance(words[2])["id"],
                                                     "keys": words[3:]})
        print(json.dumps(pool, indent=2) if args.json else f"{pool['free']} free key(s) in the pool", file=out)
        return OK
    if len(words) >= 4 and words[1:3] in (["host", "attr"], ["appliance", "attr"], ["os", "attr"]):
        return attr_verb(args, client, words[0], words[1], words[3], words[4:])
    if len(words) >= 2 and words[1] == "attr":
        return attr_verb(args, client, words[0], "global", None, words[2:])
    if words[:2] == ["list", "cluster"]:
        _, kv = options(words[2:], {"status"})
        found = client.call("GET", "/clusters")["items"]
        status = kv.get("status", "n").lower() in ("y", "yes", "true", "1")
        print(json.dumps(found, indent=2) if args.json else cluster_table(found, status), file=out)
        return OK
    if words[:2] == ["add", "cluster"]:
        plain, kv = options(words[2:], CLUSTER_OPTIONS)
        if len(plain) != 3:
            raise CliError(USAGE, "add cluster FQDN IP N [appliance=A] [mem=MB] [fe-mem=MB] [servers=H1,H2] ...")
        return finish(args, client, client.call("POST", "/clusters", cluster_body(client, *plain, kv)))
    if len(words) == 3 and words[1] == "cluster" and (words[0] in POWER_VERBS or words[0] == "remove"):
        cluster = find_cluster(client, words[2])
        if words[0] == "remove":
            return finish(args, client, client.call("DELETE", f"/clusters/{cluster['id']}"))
        action = POWER_VERBS[words[0]]
        if action not in ("start", "poweroff", "shutdown"):
            raise CliError(USAGE, "start|stop|shutdown|remove cluster NAME")
        return finish(args, client, client.call("POST", f"/clusters/{cluster['id']}/actions", {"action": action}))
    if len(words) >= 4 and words[1:3] == ["host", "vm"]:
        verb, name, rest = words[0], words[3], words[4:]
        if verb in POWER_VERBS and not rest:
            vm = client.vm(name)
            return finish(args, client, client.call("POST", f"/vms/{vm['id']}/power",
                                                    {"action": POWER_VERBS[verb]}))
        if verb == "set":
            _, kv = options(rest, {"mem", "cpus", "disksize"})
            if not kv:
                raise CliError(USAGE, "set host vm NAME [mem=MB] [cpus=N] [disksize=GB]")
            vm = client.vm(name)
            body = {}
            if "mem" in kv:
                body["memory_mb"] = whole(kv["mem"], "mem")
            if "cpus" in kv:
                body["vcpus"] = whole(kv["cpus"], "cpus")
            if "disksize" in kv:  # the first (boot) disk, as in Rocks; others keep their size
                body["disk_gb"] = [whole(kv["disksize"], "disksize")] + [d["size_gb"] for d in vm["disks"][1:]]
            return finish(args, client, client.call("PATCH", f"/vms/{vm['id']}", body))
        if verb == "move" and len(rest) == 1:
            vm, target = client.vm(name), client.server(rest[0])
            mode = "live" if vm["state"] in ("running", "paused") else "cold"
            return finish(args, client, client.call("POST", f"/vms/{vm['id']}/move",
                                                    {"mode": mode, "server_id": target["id"]}))
        if verb == "remove" and not rest:
            vm = client.vm(name)
            return finish(args, client, client.call("DELETE", f"/vms/{vm['id']}"))
    raise CliError(USAGE, USAGE_TEXT)


def finish(args: argparse.Namespace, client: Client, accepted: dict) -> int:
    task = accepted["task"] if args.no_wait else wait_for(client, accepted, show=not args.json)
    if args.json:
        print(json.dumps(task, indent=2))
    else:
        print(f"task {task['id']} {task['state']}: {task['title']}" + (f": {task['error']}" if task["error"] else ""))
    if task["state"] in ("queued", "running", "succeeded"):
        return OK
    return TASK_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral-cli", usage=USAGE_TEXT,
                                     description="Operate a Corral portal from the command line (Rocks-style verbs).")
    parser.add_argument("--url", help="the portal (default: CORRAL_URL or the config file)")
    parser.add_argument("--token", help="an API token (default: CORRAL_TOKEN or the config file)")
    parser.add_argument("--json", action="store_true", help="print JSON documents instead of tables")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for tasks to end")
    parser.add_argument("words", nargs="*")
    args = parser.parse_args(argv)
    if not args.words:
        parser.print_usage(sys.stderr)
        return USAGE
    try:
        url, token = load_config(args.url, args.token)
        return run(args, Client(url, token))
    except CliError as exc:
        print(f"corral-cli: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
