"""The library's rules as plain functions: OVF parsing, the name rule, catalog index checks, image inspection.

The end-to-end imports (upload, OVA, catalog, copy back through a real
worker) are in tests/test_library.py and tests/test_catalog.py.
"""

from __future__ import annotations

import json

import pytest

from portal import catalog, library
from portal.jobs.library import ImportRejected, parse_ovf
from portal.vmm import convert

ENVELOPE = """<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:id="f1" ovf:href="disk1.vmdk"/></References>
  <DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1"/></DiskSection>
  <VirtualSystem ovf:id="vm"><Name>{name}</Name><VirtualHardwareSection>
    <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity></Item>
    <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType>
      <rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
  </VirtualHardwareSection></VirtualSystem>
</Envelope>"""


def test_parse_ovf_reads_name_sizes_and_disks():
    info = parse_ovf(ENVELOPE.format(name="web", cpus=2))
    assert info == {"name": "web", "memory_mb": 2048, "vcpus": 2, "files": ["disk1.vmdk"]}


def test_parse_ovf_refuses_a_quantity_that_is_not_a_number():
    with pytest.raises(ImportRejected, match="unreadable CPU or memory quantity"):
        parse_ovf(ENVELOPE.format(name="web", cpus="two"))


def test_parse_ovf_refuses_any_dtd():
    with pytest.raises(ImportRejected, match="declares a DTD or XML entities"):
        parse_ovf('<?xml version="1.0"?><!DOCTYPE Envelope SYSTEM "http://127.0.0.1:9/x.dtd">'
                  + ENVELOPE.format(name="web", cpus=1))


@pytest.mark.parametrize("text, name", [
    ("Ubuntu Server 22.04 — LTS", "Ubuntu Server 22.04 - LTS"),
    ("');alert(1);('", "alert-1"),
    ("<img src=x onerror=alert(1)>", "img src-x onerror-alert-1"),
    ("a" * 80, "a" * 64),
])
def test_foreign_names_are_made_to_follow_the_rule(text, name):
    assert library.name_from(text) == name == library.check_name(name)


@pytest.mark.parametrize("text", ["", "!!", "<>", "x"])
def test_foreign_names_with_nothing_usable_are_refused(text):
    with pytest.raises(library.LibraryError, match="A name has 2 to 64"):
        library.name_from(text)


@pytest.mark.parametrize("name", ["a/b", "x", " -lead", "');alert(1);('", "ok\nnewline", "é-accent"])
def test_the_name_rule_refuses(name):
    with pytest.raises(library.LibraryError):
        library.check_name(name)


def test_catalog_disk_urls_are_resolved_and_each_must_be_http():
    disk = {"sha256": "a" * 64, "size_bytes": 1}
    doc = {"appliances": [{"name": "two", "min_memory_mb": 128, "max_memory_mb": 256,
                           "disks": [{**disk, "url": "d0.qcow2"}, {**disk, "url": "https://mirror.test/d1"}]}]}
    entries = catalog.parse_index(json.dumps(doc).encode(), "http://127.0.0.1/cat/index.json")
    assert [d["url"] for d in entries[0]["disks"]] == ["http://127.0.0.1/cat/d0.qcow2", "https://mirror.test/d1"]
    doc["appliances"][0]["disks"][1]["url"] = "file:///etc/shadow"
    with pytest.raises(catalog.CatalogError, match="disk 2 is not an http:// or https:// address"):
        catalog.parse_index(json.dumps(doc).encode(), "http://127.0.0.1/cat/index.json")


def test_inspect_names_the_file_by_its_label(tmp_path):
    text = tmp_path / "upload-0"
    text.write_bytes(b"not a disk\n" * 200)
    with pytest.raises(convert.ImageRejected, match="^notes.qcow2 is not a disk image"):
        convert.inspect(text, label="notes.qcow2")
    assert convert.compression_of(text) is None
