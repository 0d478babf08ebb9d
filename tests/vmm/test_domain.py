"""The domain XML module: valid under libvirt's schema, and it boots on a bed server."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from portal.vmm import appliance
from portal.vmm.domain import DiskSpec, DomainSpec, NicSpec, render, target_devs
from tests.bed.core import GUEST_BRIDGE
from tests.bed.guest import wait_for_serial


def validate(xml: str, tmp_path) -> None:
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    r = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr + xml


VARIANTS = {
    "minimal": DomainSpec(name="a1", uuid=str(uuid.uuid4()), memory_mb=256),
    "user-mode-nic": DomainSpec(name="u1", uuid=str(uuid.uuid4()), memory_mb=256,
                                nics=(NicSpec("02:c0:00:00:03:00"),)),
    "appliance": DomainSpec(name="web-01", uuid=str(uuid.uuid4()), memory_mb=512, vcpus=2,
                            disks=(DiskSpec("/var/lib/corral/disk1/web-01/disk0.qcow2"),),
                            nics=(NicSpec("02:c0:00:00:01:00", bridge="br0"),), serial_log="/var/log/x.log"),
    "kvm": DomainSpec(name="k", uuid=str(uuid.uuid4()), memory_mb=1024, domain_type="kvm",
                      disks=(DiskSpec("/d/k.raw", format="raw"),)),
    "blank-with-iso": DomainSpec(name="blank", uuid=str(uuid.uuid4()), memory_mb=512, cdrom="/lib/iso/x.iso",
                                 usb_tablet=True,
                                 disks=(DiskSpec("/d/0.qcow2", bus="ide"), DiskSpec("/d/1.qcow2", bus="scsi"),
                                        DiskSpec("/d/2.qcow2", bus="virtio")),
                                 nics=(NicSpec("02:c0:00:00:02:00", network="default"),
                                       NicSpec("02:c0:00:00:02:01", bridge="br0"))),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_xml_is_valid_for_libvirt(variant, tmp_path):
    validate(render(VARIANTS[variant]), tmp_path)


def test_device_names_per_bus_leave_hdc_for_the_cdrom():
    disks = (DiskSpec("a", bus="ide"), DiskSpec("b", bus="ide"), DiskSpec("c", bus="ide"),
             DiskSpec("d", bus="virtio"), DiskSpec("e", bus="scsi"))
    assert target_devs(disks) == ["hda", "hdb", "hdd", "vda", "sda"]


def test_xml_escapes_and_rejects_bad_input():
    xml = render(DomainSpec(name="x", uuid=str(uuid.uuid4()), memory_mb=64, description="a <b> & 'c'"))
    assert "a &lt;b&gt; &amp; 'c'" in xml
    with pytest.raises(ValueError):
        render(DomainSpec(name="x", uuid=str(uuid.uuid4()), memory_mb=64, domain_type="xen"))
    with pytest.raises(ValueError):
        render(DomainSpec(name="x", uuid=str(uuid.uuid4()), memory_mb=64, disks=(DiskSpec("/a", bus="floppy"),)))


@pytest.mark.bed
def test_rendered_domain_boots_the_appliance(bed_servers, appliance_image, domain_type, tmp_path):
    bs = bed_servers[0]
    name = "xmlboot"
    disk = f"{bs.images_dir}/{name}.qcow2"
    log = f"/var/log/libvirt/qemu/{name}.serial.log"
    subprocess.run(["cp", str(appliance_image), str(bs.host_path(disk))], check=True)
    bs.host_path(log).unlink(missing_ok=True)
    spec = DomainSpec(name=name, uuid=str(uuid.uuid4()), memory_mb=256, domain_type=domain_type,
                      disks=(DiskSpec(disk),), nics=(NicSpec("02:c0:00:00:99:00", bridge=GUEST_BRIDGE),),
                      serial_log=log, usb_tablet=True)
    xml = render(spec)
    validate(xml, tmp_path)
    virsh = ["virsh", "-c", bs.uri_tcp]
    try:
        subprocess.run([*virsh, "create", "/dev/stdin"], input=xml, text=True, check=True, capture_output=True)
        state = wait_for_serial(bs.host_path(log), lambda s: len(s.heartbeats) >= 3, timeout=90, what="heartbeats")
        assert state.ready and state.name == name
        mac = subprocess.run([*virsh, "domiflist", name], capture_output=True, text=True, check=True).stdout
        assert "02:c0:00:00:99:00" in mac
    finally:
        subprocess.run([*virsh, "destroy", name], capture_output=True)
        bs.host_path(disk).unlink(missing_ok=True)
    assert appliance.READY_MARKER in bs.host_path(log).read_text()
