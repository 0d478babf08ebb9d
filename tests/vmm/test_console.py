"""vmm.console: incremental reads of serial logs, on this machine through a real LocalSession."""

from __future__ import annotations

from portal.vmm.console import ConsoleChunk, read_new
from portal.vmm.session import LocalSession, Target


def _session() -> LocalSession:
    return LocalSession(Target(hostname="here", address="127.0.0.1", transport="local"))


def test_reads_only_what_was_appended_exact_bytes_and_several_logs_in_one_command(tmp_path):
    log, other = tmp_path / "a.serial.log", tmp_path / "b.serial.log"
    log.write_bytes(b"boot\r\n")
    other.write_bytes(b"x" * 10)
    with _session() as s:
        first, missing, second = read_new(s, [(str(log), 0), (str(tmp_path / "none.log"), 0), (str(other), 4)], 64)
        assert first == ConsoleChunk(b"boot\r\n", 6) and missing is None and second == ConsoleChunk(b"xxxxxx", 10)
        with log.open("ab") as fh:
            fh.write(b"caf\xc3\xa9 \xff\x00 CORRAL-READY\n")
        (chunk,) = read_new(s, [(str(log), first.offset)], 64)
        assert chunk == ConsoleChunk(b"caf\xc3\xa9 \xff\x00 CORRAL-READY\n", log.stat().st_size)
        assert read_new(s, [(str(log), chunk.offset)], 64) == [ConsoleChunk(b"", chunk.offset)]


def test_a_long_backlog_gives_its_tail_and_a_shorter_log_is_read_afresh(tmp_path):
    log = tmp_path / "vm.serial.log"
    log.write_bytes(b"".join(b"line %04d\n" % i for i in range(1000)))
    with _session() as s:
        (chunk,) = read_new(s, [(str(log), 0)], 20)
        assert chunk == ConsoleChunk(b"line 0998\nline 0999\n", 10000)
        log.write_bytes(b"new boot\n")  # rewritten at boot (append='off') or rotated
        assert read_new(s, [(str(log), chunk.offset)], 20) == [ConsoleChunk(b"new boot\n", 9)]
