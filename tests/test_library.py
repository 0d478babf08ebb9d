"""The library: uploads detected by content, converted to qcow2; rejects leave nothing behind."""

from __future__ import annotations

import gzip
import io
import lzma
import subprocess
from pathlib import Path

import pytest
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from portal.extensions import db
from portal.models import ActionLog, Appliance, IsoImage, Task
from portal.shared import shared_dir
from portal.vmm import appliance as builder
from tests.bed import Bed
from tests.conftest import make_user, run_worker_burst


@pytest.fixture(scope="session")
def image() -> Path:
    """The small test appliance (qcow2), built once and cached where the bed keeps it."""
    return Path(builder.build_appliance(Bed().appliance_cache))


def post_multipart(client, url, fields: dict, files: list[tuple[str, str, bytes]], **kw):
    """A multipart POST encoded in memory (the test client's own encoder leaves a temp file open)."""
    data = MultiDict(fields)
    for field, filename, content in files:
        data.add(field, FileStorage(io.BytesIO(content), filename=filename))
    boundary, body = encode_multipart(data)
    return client.post(url, data=body, content_type=f"multipart/form-data; boundary={boundary}", **kw)


def upload(client, name, files, **extra):
    fields = {"name": name, "min_memory_mb": 128, "max_memory_mb": 1024, "vcpus": 1, **extra}
    return post_multipart(client, "/library/appliances/upload", fields,
                          [("disks", filename, content) for filename, content in files])


def finished_task(app) -> Task:
    with app.app_context():
        task = db.session.execute(db.select(Task).order_by(Task.id.desc())).scalars().first()
        db.session.expunge(task)
        return task


def shared_root(app) -> Path:
    with app.app_context():
        return shared_dir()


def library_files(app) -> list[Path]:
    """Every file left in the shared area (library, uploads, downloads, copy-back work folders)."""
    root = shared_root(app)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "catalog.json")


def convert(image: Path, fmt: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"img.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(image), str(out)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("fmt, compress", [("qcow2", None), ("qcow2", "gz"), ("raw", "xz"), ("vmdk", None),
                                           ("vdi", "zst")])
def test_upload_detects_format_by_content_and_converts(app, manager, image, tmp_path, fmt, compress):
    content = image.read_bytes() if fmt == "qcow2" else convert(image, fmt, tmp_path)
    if compress == "gz":
        content = gzip.compress(content)
    elif compress == "xz":
        content = lzma.compress(content)
    elif compress == "zst":
        raw = tmp_path / "in"
        raw.write_bytes(content)
        subprocess.run(["zstd", "-q", "-f", str(raw), "-o", str(tmp_path / "in.zst")], check=True)
        content = (tmp_path / "in.zst").read_bytes()
    # A misleading file name: the format comes from the contents.
    r = upload(manager, f"app-{fmt}", [("disk.iso", content)])
    assert r.status_code == 302
    run_worker_burst()
    task = finished_task(app)
    assert task.state == "succeeded", task.log
    with app.app_context():
        row = db.session.execute(db.select(Appliance).where(Appliance.name == f"app-{fmt}")).scalar_one()
        assert row.state == "ready" and len(row.disks) == 1
        disk = row.disks[0]
        assert disk.format == "qcow2" and disk.virtual_size_bytes == builder.DISK_SIZE and len(disk.sha256) == 64
        info = subprocess.run(["qemu-img", "info", disk.path], capture_output=True, text=True).stdout
        assert "file format: qcow2" in info
    assert not list((shared_root(app) / "uploads").iterdir())  # upload area emptied


@pytest.mark.parametrize("filename, content, message", [
    ("notes.qcow2", b"this is a text file, not a disk\n" * 100, "not a disk image"),
    ("broken.qcow2.gz", b"\x1f\x8b\x08\x00" + b"garbage" * 50, "gz data is damaged"),
    ("empty.raw", b"", "not a disk image"),
])
def test_bad_uploads_are_rejected_and_leave_nothing(app, manager, filename, content, message):
    r = upload(manager, "bad-app", [(filename, content)])
    assert r.status_code == 302
    run_worker_burst()
    task = finished_task(app)
    assert task.state == "failed" and message in task.error, task.error
    assert filename in task.error or filename.startswith("empty")
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Appliance.id))).scalar_one() == 0
    assert library_files(app) == []


def test_truncated_qcow2_is_rejected(app, manager, image):
    data = image.read_bytes()
    r = upload(manager, "cut", [("cut.qcow2", data[: len(data) // 3])])
    assert r.status_code == 302
    run_worker_burst()
    task = finished_task(app)
    assert task.state == "failed" and "cut.qcow2" in task.error
    assert library_files(app) == []


def test_upload_form_rejects_bad_input_without_a_task(app, manager, image):
    good = [("d.qcow2", b"x")]
    cases = [
        ("", good, {}, "This field is required"),
        ("a/b", good, {}, "A name has 2 to 64 letters"),
        ("');alert(1);('", good, {}, "A name has 2 to 64 letters"),
        ("<img src=x onerror=alert(1)>", good, {}, "A name has 2 to 64 letters"),
        ("ok-name", [], {}, "Choose one to four disk image files"),
        ("ok-name", good * 5, {}, "Choose one to four disk image files"),
        ("ok-name", good, {"min_memory_mb": 2048, "max_memory_mb": 1024}, "minimum memory is above the maximum"),
    ]
    for name, files, extra, message in cases:
        r = upload(manager, name, files, **extra)
        assert r.status_code == 400 and message in r.get_data(as_text=True), (name, message)
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Task.id))).scalar_one() == 0
    assert library_files(app) == []


def test_iso_upload_and_rejection(app, manager):
    iso = Path(builder.build_iso(Bed().appliance_cache))
    r = post_multipart(manager, "/library/isos/upload", {"name": "boot-iso"}, [("iso", "x.iso", iso.read_bytes())],
                       follow_redirects=True)
    assert "Added the ISO image boot-iso" in r.get_data(as_text=True)
    r = post_multipart(manager, "/library/isos/upload", {"name": "fake"}, [("iso", "f.iso", b"nope" * 9000)])
    assert r.status_code == 400 and "not an ISO 9660 image" in r.get_data(as_text=True)
    with app.app_context():
        rows = db.session.execute(db.select(IsoImage)).scalars().all()
        assert [r.name for r in rows] == ["boot-iso"] and rows[0].size_bytes == iso.stat().st_size
    assert len([p for p in library_files(app) if p.suffix == ".iso"]) == 1


def test_deleting_an_appliance_keeps_vms(app, manager, image):
    from portal import library
    from tests.conftest import make_vm

    with app.app_context():
        app.config["APPLIANCE_CACHE"] = str(Bed().appliance_cache)
        row = library.ensure_test_appliance()
        vm = make_vm(make_user("pat"), "keepme", appliance_id=row.id)
        db.session.commit()
        ids = row.id, vm.id
    r = manager.post(f"/library/appliances/{ids[0]}/delete", follow_redirects=True)
    assert "VMs created from it are untouched" in r.get_data(as_text=True)
    with app.app_context():
        from portal.models import VM

        vm = db.session.get(VM, ids[1])
        assert vm is not None and vm.appliance_id is None
        assert db.session.execute(db.select(ActionLog).where(ActionLog.action == "appliance-deleted")).scalar_one()
    assert library_files(app) == []


OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:id="file1" ovf:href="{href}"/></References>
  <DiskSection><Info>Disks</Info><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="33554432"/></DiskSection>
  <VirtualSystem ovf:id="tinyvm">
    <Info>A tiny VM</Info><Name>{name}</Name>
    <VirtualHardwareSection><Info>Hardware</Info>
      <Item><rasd:ElementName>2 CPUs</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>512 MB</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>512</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>disk</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def make_ova(image: Path, tmp_path: Path, *, href="tiny-disk1.vmdk", manifest=True, corrupt_manifest=False,
             include_ovf=True, ovf_name="tiny-ova", ovf_text: str | None = None, extra_manifest=()) -> bytes:
    import hashlib
    import tarfile
    from xml.sax.saxutils import escape

    work = tmp_path / "ova-src"
    work.mkdir()
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(image),
                    str(work / "tiny-disk1.vmdk")], check=True)
    (work / "tiny.ovf").write_text(ovf_text or OVF.format(href=href, name=escape(ovf_name)))
    members = ["tiny.ovf", "tiny-disk1.vmdk"] if include_ovf else ["tiny-disk1.vmdk"]
    if manifest:
        lines = []
        for m in members:
            digest = hashlib.sha256((work / m).read_bytes()).hexdigest()
            lines.append(f"SHA256({m})= {'0' * 64 if corrupt_manifest else digest}")
        lines.extend(extra_manifest)
        (work / "tiny.mf").write_text("\n".join(lines) + "\n")
        members.append("tiny.mf")
    out = tmp_path / "tiny.ova"
    with tarfile.open(out, "w") as tar:
        for m in members:
            tar.add(work / m, arcname=m)
    return out.read_bytes()


def test_ova_import_reads_the_envelope_and_converts_disks(app, manager, image, tmp_path):
    r = post_multipart(manager, "/library/appliances/import-ova", {"name": ""},
                       [("ova", "tiny.ova", make_ova(image, tmp_path))])
    assert r.status_code == 302
    run_worker_burst()
    task = finished_task(app)
    assert task.state == "succeeded", task.log
    with app.app_context():
        row = db.session.execute(db.select(Appliance).where(Appliance.name == "tiny-ova")).scalar_one()
        assert (row.min_memory_mb, row.vcpus, row.source, row.state) == (512, 2, "ova", "ready")
        assert row.disks[0].format == "qcow2" and row.disks[0].virtual_size_bytes == builder.DISK_SIZE
    assert not list((shared_root(app) / "uploads").iterdir())


@pytest.mark.parametrize("kwargs, message", [
    ({"include_ovf": False}, "holds no .ovf descriptor"),
    ({"href": "missing.vmdk", "manifest": False}, "which is not in the archive"),
    ({"corrupt_manifest": True}, "does not match its SHA256 checksum"),
])
def test_bad_ova_is_rejected_and_leaves_nothing(app, manager, image, tmp_path, kwargs, message):
    r = post_multipart(manager, "/library/appliances/import-ova", {"name": "x-ova"},
                       [("ova", "bad.ova", make_ova(image, tmp_path, **kwargs))])
    assert r.status_code == 302
    run_worker_burst()
    task = finished_task(app)
    assert task.state == "failed" and message in task.error, task.error
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Appliance.id))).scalar_one() == 0
    assert library_files(app) == []


def test_not_a_tar_is_rejected(app, manager):
    r = post_multipart(manager, "/library/appliances/import-ova", {"name": ""}, [("ova", "x.ova", b"plain text" * 99)])
    assert r.status_code == 302
    run_worker_burst()
    assert "is not an OVA (tar) archive" in finished_task(app).error
    assert library_files(app) == []


def import_ova(app, manager, ova: bytes, name: str = "") -> Task:
    r = post_multipart(manager, "/library/appliances/import-ova", {"name": name}, [("ova", "x.ova", ova)])
    assert r.status_code == 302
    run_worker_burst()
    return finished_task(app)


def appliance_names(app) -> list[str]:
    with app.app_context():
        return list(db.session.execute(db.select(Appliance.name)).scalars())


@pytest.mark.parametrize("ovf_name, expected", [("');alert(1);('", "alert-1"),
                                                ("<img src=x onerror=alert(1)>", "img src-x onerror-alert-1")])
def test_an_ova_own_name_follows_the_name_rule(app, manager, image, tmp_path, ovf_name, expected):
    task = import_ova(app, manager, make_ova(image, tmp_path, ovf_name=ovf_name))
    assert task.state == "succeeded", task.log
    assert appliance_names(app) == [expected]  # made into a valid name, deterministically


def test_an_ova_name_that_cannot_be_used_is_refused(app, manager, image, tmp_path):
    task = import_ova(app, manager, make_ova(image, tmp_path, ovf_name="<<!>>"))
    assert task.state == "failed" and "give the appliance a name" in task.error, task.error
    assert appliance_names(app) == [] and library_files(app) == []


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE Envelope [
  <!ENTITY a "ha"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
  <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;"><!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
  <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;"><!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;">
]>
"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE Envelope [<!ENTITY host SYSTEM "file:///etc/hostname">]>
"""


@pytest.mark.parametrize("prolog, entity", [(BILLION_LAUGHS, "&g;"), (EXTERNAL_ENTITY, "&host;")],
                         ids=["billion-laughs", "external-entity"])
def test_hostile_ovf_xml_is_refused_and_leaves_nothing(app, manager, image, tmp_path, prolog, entity):
    body = OVF.format(href="tiny-disk1.vmdk", name=entity).split("?>", 1)[1]
    task = import_ova(app, manager, make_ova(image, tmp_path, ovf_text=prolog + body))
    assert task.state == "failed" and "declares a DTD or XML entities" in task.error, task.error
    assert appliance_names(app) == [] and library_files(app) == []


@pytest.mark.parametrize("line", [
    "SHA256(../../etc/passwd)= " + "0" * 64,
    "SHA256(/etc/hostname)= {hostname}",  # the right digest: before, this read a file outside the OVA
])
def test_manifest_names_outside_the_package_are_refused(app, manager, image, tmp_path, line):
    import hashlib

    line = line.format(hostname=hashlib.sha256(Path("/etc/hostname").read_bytes()).hexdigest())
    name = line[len("SHA256("):line.index(")=")]
    task = import_ova(app, manager, make_ova(image, tmp_path, extra_manifest=[line]), name="x-ova")
    assert task.state == "failed", task.log
    assert f"The manifest names {name}, which is not in the archive" in task.error, task.error
    assert appliance_names(app) == [] and library_files(app) == []


def test_add_appliance_flushes_and_a_failure_after_the_flush_leaves_nothing(app, image, tmp_path):
    import shutil

    from portal import library

    fields = dict(description=None, min_memory_mb=128, max_memory_mb=1024, vcpus=1, source="upload", user_id=None,
                  detail="test")
    with app.app_context():
        disk = tmp_path / "good.qcow2"
        shutil.copyfile(image, disk)
        row = library.add_appliance([disk], name="flushed", **fields)
        assert row.id is not None and row.state == "ready" and row.disks[0].format == "qcow2"
        db.session.rollback()  # the edge decides: nothing was committed
        assert not library.appliance_exists("flushed")
        library.remove_appliance_files(row.id)

        shutil.copyfile(image, disk)
        raw = tmp_path / "raw.img"
        raw.write_bytes(b"\0" * (1 << 20))
        with pytest.raises(library.LibraryError, match="expected qcow2"):
            library.add_appliance([disk, raw], name="half", **fields)  # fails after flushing the row and disk 0
        db.session.rollback()
        assert db.session.execute(db.select(db.func.count(Appliance.id))).scalar_one() == 0
    assert library_files(app) == []


def test_uploads_and_the_library_live_under_the_shared_path(app, manager, image, tmp_path, monkeypatch):
    shared = tmp_path / "nfs"
    monkeypatch.setenv("CORRAL_SHARED_PATH", str(shared))  # the worker, another process, reads it too
    app.config["SHARED_PATH"] = str(shared)
    assert upload(manager, "on-nfs", [("d.qcow2", image.read_bytes())]).status_code == 302
    run_worker_burst()
    assert finished_task(app).state == "succeeded", finished_task(app).log
    with app.app_context():
        row = db.session.execute(db.select(Appliance).where(Appliance.name == "on-nfs")).scalar_one()
        assert Path(row.disks[0].path).is_relative_to(shared / "library")
    assert not (Path(app.instance_path) / "library").exists()
    assert not list((shared / "uploads").iterdir())


@pytest.mark.parametrize("name, message", [("');alert(1);('", "A name has 2 to 64 letters"),
                                           ("taken", "An appliance called taken exists already")])
def test_copy_back_job_applies_the_name_rule(app, image, tmp_path, name, message):
    import shutil

    from portal import library, tasks
    from portal.jobs.library import copy_back
    from tests.conftest import make_vm, start_task

    with app.app_context():
        disk = tmp_path / "taken.qcow2"
        shutil.copyfile(image, disk)
        library.add_appliance([disk], name="taken", description=None, min_memory_mb=128, max_memory_mb=1024,
                              vcpus=1, source="upload", user_id=None, detail="test")
        user = make_user("boss", "manager")
        vm = make_vm(user, "src")
        start_task(tasks.submit("vm-copy-back", copy_back, title="copy back", requester_id=user.id, key=None,
                                args=(vm.id, name, user.id)))
    run_worker_burst()
    task = finished_task(app)
    assert task.state == "failed" and message in task.error, task.error
    assert appliance_names(app) == ["taken"]
