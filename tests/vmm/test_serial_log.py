"""parse_serial_log: the appliance's serial markers, whole lines only, with the serial shell's prompt
allowed in front of a marker (the shell prints its prompt while the heartbeat loop writes)."""

from portal.vmm.appliance import parse_serial_log


def test_markers_in_whole_lines():
    st = parse_serial_log("boot noise\r\nCORRAL-READY vm1\r\nCORRAL-HB 1\r\nCORRAL-HB 2\r\nCORRAL-HB 6")
    assert (st.ready, st.name, st.heartbeats, st.last_heartbeat) == (True, "vm1", [1, 2], 2)


def test_a_shell_prompt_before_a_marker_does_not_hide_it():
    text = ("CORRAL-READY vm1\n/ # \x1b[6nCORRAL-HB 1\nCORRAL-HB 2\n\x1b[6n~ # ~ # CORRAL-HB 3\n"
            "~ # CORRAL-SHUTDOWN vm1 3\n")
    st = parse_serial_log(text)
    assert st.heartbeats == [1, 2, 3] and st.shutdown


def test_typed_text_is_not_a_heartbeat():
    assert parse_serial_log("~ # echo CORRAL-HB 9\nxCORRAL-HB 4\n").heartbeats == []
