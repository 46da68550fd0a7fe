"""hardware_service: the hardware line (contract section 1) from fixture trees, built trees and this
machine."""

import base64
import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

import hardware_service
import security
from hardware_service import HardwareService, collect_hardware

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hardware"
LINE = re.compile(r"CPU: [^\n]*\. GPU: [^\n]*\. Memory: [0-9]*\. DriveSerial: [^\n]*")

EXPECTED = {
    "x86_nvme": "CPU: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz. GPU: NVIDIA 10DE:2236. "
    "Memory: 263722648. DriveSerial: S4EWNX0R812345K",
    "jetson_orin": "CPU: NVIDIA Jetson AGX Orin Developer Kit. GPU: NVIDIA Tegra234. "
    "Memory: 30536068. DriveSerial: 150100444736344201b3e4a1c7014800",
    "rpi5": "CPU: Raspberry Pi 5 Model B Rev 1.0. GPU: . Memory: 8245328. "
    "DriveSerial: 1b534d454231515430d2b3c4a5016400",
    "container": "CPU: AMD EPYC 7763 64-Core Processor. GPU: . Memory: 65843920. DriveSerial: ",
}

CPUINFO = "processor\t: 0\nmodel name\t: Test CPU\n"
MEMINFO = "MemTotal:        1024 kB\n"


def build(root, files, links=()):
    """A tree of files (text or bytes) and relative symlinks, as sysfs lays them out."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for rel, target in links:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    return root


def mountinfo(*lines):
    return {"proc/cpuinfo": CPUINFO, "proc/meminfo": MEMINFO, "proc/self/mountinfo": "\n".join(lines) + "\n"}


def serial_of(line):
    return line.rsplit("DriveSerial: ", 1)[1]


def test_module_is_compiled():
    assert hardware_service.__file__.endswith(".so")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_tree_gives_exact_line(name):
    assert collect_hardware(FIXTURES / name) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_reads_are_identical(name):
    service = HardwareService(FIXTURES / name)
    assert service.hardware == service.hardware == collect_hardware(str(FIXTURES / name))


def test_hardware_hash_is_the_contract_hash_of_the_line():
    service = HardwareService(FIXTURES / "x86_nvme")
    digest = hashlib.sha384(("Azaion_" + EXPECTED["x86_nvme"] + "_%$$$)0_").encode()).digest()
    assert (
        service.hardware_hash == base64.b64encode(digest).decode() == security.hardware_hash(service.hardware)
    )


def test_line_is_cached_after_first_read(tmp_path):
    root = shutil.copytree(FIXTURES / "rpi5", tmp_path / "rpi5", symlinks=True)
    service = HardwareService(root)
    first = service.hardware
    (root / "proc" / "meminfo").write_text("MemTotal:  1 kB\n")
    assert service.hardware == first
    assert HardwareService(root).hardware != first


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("proc/meminfo", EXPECTED["x86_nvme"].replace("263722648", "")),
        ("proc/cpuinfo", EXPECTED["x86_nvme"].replace("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "")),
        ("proc/self/mountinfo", EXPECTED["x86_nvme"]),  # then the only physical disk in /sys/block
        ("sys/block", EXPECTED["x86_nvme"]),  # the root's device number still leads to the disk
        (
            "sys/devices/pci0000:3a/0000:3a:02.0/0000:3d:00.0/nvme/nvme0/nvme0n1/device/serial",
            EXPECTED["x86_nvme"].replace("S4EWNX0R812345K", ""),
        ),
        ("sys/class/drm", EXPECTED["x86_nvme"]),  # the PCI bus still shows the GPU
        ("sys/bus", EXPECTED["x86_nvme"]),  # the DRM card still shows it
        ("sys", "CPU: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz. GPU: . Memory: 263722648. DriveSerial: "),
    ],
)
def test_missing_piece_gives_empty_field(tmp_path, missing, expected):
    root = shutil.copytree(FIXTURES / "x86_nvme", tmp_path / "x86", symlinks=True)
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert collect_hardware(root) == expected


def test_nothing_at_all_gives_empty_fields(tmp_path):
    assert collect_hardware(tmp_path / "absent") == "CPU: . GPU: . Memory: . DriveSerial: "


def test_reads_never_leave_the_root(tmp_path):
    outside = build(tmp_path / "outside", {"meminfo": MEMINFO})
    root = build(tmp_path / "root", {"proc/cpuinfo": CPUINFO}, [("proc/meminfo", outside / "meminfo")])
    assert collect_hardware(root) == "CPU: Test CPU. GPU: . Memory: . DriveSerial: "


def test_stacked_root_takes_the_serial_of_the_disk_underneath(tmp_path):
    # LVM on a SATA disk: dm-0 -> sda3 -> sda, whose serial is only in VPD page 0x80.
    disk = "devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block/sda"
    vpd = b"\x00\x80\x00\x14" + b"   WD-WCC4N1234567  " + b"\x00\x00"
    root = build(
        tmp_path,
        {
            **mountinfo("25 1 253:0 / / rw - ext4 /dev/mapper/vg-root rw"),
            f"sys/{disk}/device/vpd_pg80": vpd,
            f"sys/{disk}/sda3/partition": "3\n",
            "sys/devices/virtual/block/dm-0/dm/name": "vg-root\n",
        },
        [
            ("sys/dev/block/253:0", "../../devices/virtual/block/dm-0"),
            ("sys/devices/virtual/block/dm-0/slaves/sda3", f"../../../../../{disk}/sda3"),
        ],
    )
    assert serial_of(collect_hardware(root)) == "WD-WCC4N1234567"


def test_anonymous_root_device_is_found_by_its_source(tmp_path):
    # btrfs reports 0:N for a subvolume; the source still names the partition.
    disk = "devices/pci0000:00/0000:00:02.0/virtio1/block/vda"
    root = build(
        tmp_path,
        {
            **mountinfo("25 1 0:31 /@ / rw - btrfs /dev/vda2 rw,subvol=/@"),
            f"sys/{disk}/serial": "vm-disk-01",
            f"sys/{disk}/vda2/partition": "2\n",
        },
        [("sys/class/block/vda2", f"../../{disk}/vda2")],
    )
    assert serial_of(collect_hardware(root)) == "vm-disk-01"


def test_container_root_uses_the_host_disk_behind_bind_mounts(tmp_path):
    disk = "devices/pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0/nvme0n1"
    root = build(
        tmp_path,
        {
            **mountinfo(
                "612 520 0:52 / / rw - overlay overlay rw",
                "620 612 259:2 /var/lib/docker/containers/0c5e/hosts /etc/hosts rw - ext4 /dev/nvme0n1p2 rw",
            ),
            f"sys/{disk}/device/serial": "HOST-NVME-1\n",
            f"sys/{disk}/nvme0n1p2/partition": "2\n",
            "sys/devices/pci0000:00/0000:00:17.0/ata1/block/sda/device/serial": "OTHER-DISK\n",
        },
        [
            ("sys/dev/block/259:2", f"../../{disk}/nvme0n1p2"),
            ("sys/block/sda", "../devices/pci0000:00/0000:00:17.0/ata1/block/sda"),
        ],
    )
    assert serial_of(collect_hardware(root)) == "HOST-NVME-1"


def test_without_mounts_the_first_physical_disk_wins_over_virtual_ones(tmp_path):
    files = {
        "proc/cpuinfo": CPUINFO,
        "sys/devices/virtual/block/dm-0/serial": "dm-serial",
        "sys/devices/virtual/block/loop0/serial": "loop-serial",
        "sys/devices/platform/a/block/sdb/device/serial": "SDB",
        "sys/devices/platform/b/block/sdc/device/serial": "SDC",
    }
    links = [
        ("sys/block/dm-0", "../devices/virtual/block/dm-0"),
        ("sys/block/loop0", "../devices/virtual/block/loop0"),
        ("sys/block/sdc", "../devices/platform/b/block/sdc"),
        ("sys/block/sdb", "../devices/platform/a/block/sdb"),
    ]
    assert serial_of(collect_hardware(build(tmp_path / "both", files, links))) == "SDB"
    only_virtual = {k: v for k, v in files.items() if "/sd" not in k}
    virtual_links = [link for link in links if "/sd" not in link[0]]
    assert (
        serial_of(collect_hardware(build(tmp_path / "virtual", only_virtual, virtual_links))) == "dm-serial"
    )


def test_arm_board_without_model_lines_falls_back_to_cpu_ids(tmp_path):
    cpuinfo = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n"
    assert collect_hardware(build(tmp_path, {"proc/cpuinfo": cpuinfo})).startswith(
        "CPU: implementer 0x41 part 0xd08. GPU: ."
    )


def test_soc_gpu_without_pci_is_named_by_its_device_tree_compatible(tmp_path):
    dev = "devices/platform/axi/1002000000.v3d"
    files = {
        f"sys/{dev}/uevent": "DRIVER=v3d\nOF_NAME=v3d\nOF_COMPATIBLE_0=brcm,2712-v3d\n",
        "sys/devices/platform/simple-framebuffer.0/uevent": "DRIVER=simple-framebuffer\n",
    }
    links = [
        ("sys/class/drm/card1/device", f"../../../{dev}"),
        ("sys/class/drm/card0/device", "../../../devices/platform/simple-framebuffer.0"),
    ]
    assert "GPU: brcm,2712-v3d." in collect_hardware(build(tmp_path, files, links))


def test_real_machine_gives_a_stable_line_of_the_contract_format():
    first = collect_hardware()
    assert LINE.fullmatch(first), first
    assert re.search(r"Memory: [0-9]+\.", first), first
    assert HardwareService().hardware == first == collect_hardware("/")


def test_lspci_is_the_last_resort_and_only_for_the_live_machine(tmp_path, monkeypatch):
    if collect_hardware().split(". GPU: ")[1].split(". Memory:")[0]:
        pytest.skip("this machine names its GPU from /sys, so lspci is never reached")
    fake = tmp_path / "bin" / "lspci"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\necho \'00:01.0 "0300" "1234" "1111" -r02 "1af4" "1100"\'\n'
        'echo \'65:00.0 "0302" "10de" "2236" -ra1 "10de" "1482"\'\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert "GPU: NVIDIA 10DE:2236." in collect_hardware()
    assert collect_hardware(FIXTURES / "container") == EXPECTED["container"]
