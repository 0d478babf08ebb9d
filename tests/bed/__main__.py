"""``python -m tests.bed up --servers N [--shared] [--clean] | down [--purge] | status``."""

from __future__ import annotations

import argparse
import json
import sys

from .core import DEFAULT_STATE_DIR, Bed, BedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bed",
                                     description="Corral multi-server libvirt test bed")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                        help="state directory (default $CORRAL_BED_DIR or /tmp/corral-bed)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring servers up (idempotent); prints JSON")
    up.add_argument("--servers", "-n", type=int, default=2)
    up.add_argument("--shared", action="store_true",
                    help="bind the same directory at /srv/corral-shared on every server")
    up.add_argument("--clean", action="store_true",
                    help="wipe domains, images and logs of the servers first")
    down = sub.add_parser("down", help="stop everything of the bed")
    down.add_argument("--purge", action="store_true", help="also delete the state directory")
    sub.add_parser("status", help="print what is running (JSON)")
    ex = sub.add_parser("exec", help="run a command inside server N's namespaces")
    ex.add_argument("server", type=int)
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    bed = Bed(args.state_dir)
    try:
        if args.cmd == "up":
            servers = bed.up(n=args.servers, shared=args.shared, clean=args.clean)
            print(json.dumps({s.name: s.to_dict() for s in servers}, indent=2))
        elif args.cmd == "down":
            bed.down(purge=args.purge)
        elif args.cmd == "status":
            print(json.dumps(bed.status(), indent=2))
        elif args.cmd == "exec":
            proc = bed.exec(args.server, args.argv, check=False)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            return proc.returncode
    except BedError as exc:
        print(f"bed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
