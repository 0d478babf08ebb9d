from __future__ import annotations

import pytest

from portal import macs
from tests.conftest import make_user, make_vm


def test_generated_macs_are_unicast_local_and_unique_per_vmid_and_nic():
    seen = set()
    for vmid in (1, 2, 255, 256, 65535, 65536, 0xFFFFFF):
        for pos in (0, 1):
            mac = macs.generated(vmid, pos)
            first = int(mac[:2], 16)
            assert first & 0x02 and not first & 0x01
            assert macs.normalise(mac) == mac
            seen.add(mac)
    assert len(seen) == 14
    assert macs.generated(0x010203, 4) == "02:c0:01:02:03:04"
    with pytest.raises(macs.MacError):
        macs.generated(0)
    with pytest.raises(macs.MacError):
        macs.generated(0x1000000)


@pytest.mark.parametrize("bad, why", [
    ("01:00:5e:00:00:01", "multicast"), ("ff:ff:ff:ff:ff:ff", "multicast"), ("00:00:00:00:00:00", "not a usable"),
    ("02:00:00:00:00", "not a MAC"), ("02:00:00:00:00:0g", "not a MAC"), ("02:00:00:00:00:00; rm -rf /", "not a MAC"),
])
def test_bad_custom_macs_are_refused(bad, why):
    with pytest.raises(macs.MacError, match=why):
        macs.normalise(bad)


def test_custom_mac_must_be_unused(app):
    with app.app_context():
        vm = make_vm(make_user("pat"), "m1")
        used = vm.nics[0].mac
        with pytest.raises(macs.MacError, match="already used"):
            macs.check_custom(used.upper().replace(":", "-"))
        assert macs.check_custom("02:AA:bb:cc:dd:ee") == "02:aa:bb:cc:dd:ee"


def test_rocks_prefix_rule_and_counter():
    from portal.macs import MacError, normalise, rocks_macs, rocks_prefix

    assert rocks_prefix("137.110.119.118") == (0x76, 0x77, 0x6E)  # the seed's worked example
    assert rocks_prefix("10.0.0.1") == (0x02, 0, 0)  # local bit set
    assert rocks_prefix("10.0.0.3")[0] == 0x02  # multicast bit cleared, local bit set
    assert rocks_macs("137.110.119.118", 2) == ["76:77:6e:80:00:00", "76:77:6e:80:00:01"]
    taken = {"76:77:6e:80:00:00", "76:77:6e:80:00:02"}
    assert rocks_macs("137.110.119.118", 2, taken) == ["76:77:6e:80:00:01", "76:77:6e:80:00:03"]
    for mac in rocks_macs("1.2.3.4", 3):
        assert normalise(mac) == mac  # unicast, well formed
    with pytest.raises(MacError, match="generated"):
        rocks_prefix("1.1.192.2")  # would give 02:c0, Corral's generated range
    with pytest.raises(MacError, match="not an IPv4"):
        rocks_prefix("137.110.119")
