"""Reading a guest's serial log incrementally on its server.

libvirt (``<serial><log file=... append='on'/>``) appends everything the guest
prints on ttyS0 to a file on the server. A follower keeps an offset into that
file and asks only for what was added since, so one poll costs one short
command per server on a session it keeps open, however long the logs grow
and however many VMs the server runs.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import VmmError
from .session import HostSession

# One command for all the logs of a server: per log, a line "size offset start"
# (or "missing") and a line with the new bytes in base64 (exact bytes whatever
# the guest printed, so offsets stay byte offsets). A file shorter than the
# offset was rotated or rewritten at boot: it is read afresh. Only the last MAX
# bytes of a longer backlog are sent.
_READ_SCRIPT = r"""
max=$1; shift
while [ $# -ge 2 ]; do
  f=$1; off=$2; shift 2
  if ! size=$(stat -c %s -- "$f" 2>/dev/null); then printf 'missing\n\n'; continue; fi
  [ "$size" -lt "$off" ] && off=0
  start=$off
  [ $((size - start)) -gt "$max" ] && start=$((size - max))
  echo "$size $off $start"
  [ "$size" -gt "$start" ] && tail -c +$((start + 1)) -- "$f" | head -c $((size - start)) | base64 -w 0
  echo
done
"""


@dataclass(frozen=True)
class ConsoleChunk:
    """What one read found: the new bytes, and the offset to read from next time."""

    data: bytes
    offset: int


def read_new(session: HostSession, positions: Sequence[tuple[str, int]], max_bytes: int) -> list[ConsoleChunk | None]:
    """For each ``(log path, offset)``: the bytes appended since *offset*, at most the last *max_bytes*.

    One command on the server however many logs; None for a log that does not
    exist (the VM has not run on this server yet).
    """
    if not positions:
        return []
    argv = ["sh", "-c", _READ_SCRIPT, "console", str(int(max_bytes))]
    for path, offset in positions:
        argv += [path, str(int(offset))]
    r = session.run(argv, timeout=20)
    lines = r.stdout.split("\n")
    if len(lines) < 2 * len(positions):
        raise VmmError(f"reading serial logs on {session.target.hostname} gave {r.stdout[:200]!r}")
    return [_chunk(lines[2 * i], lines[2 * i + 1], offset, session)
            for i, (_, offset) in enumerate(positions)]


def _chunk(head: str, body: str, offset: int, session: HostSession) -> ConsoleChunk | None:
    if head == "missing":
        return None
    try:
        size, begin, start = (int(x) for x in head.split())
        data = base64.b64decode(body, validate=True)
    except ValueError as exc:
        raise VmmError(f"reading a serial log on {session.target.hostname} gave {head!r}") from exc
    if len(data) != size - start:  # the file shrank under the read: take it again next time
        return ConsoleChunk(b"", begin)
    return ConsoleChunk(data, size)
