# cython: language_level=3, embedsignature=True
"""The ``hardware`` line of contract section 1, read from /proc and /sys.

    CPU: {cpu}. GPU: {gpu}. Memory: {mem_kb}. DriveSerial: {serial}

The Resource API binds an account to this exact string, so every field comes from a source that
survives reboots, driver installs and device renumbering: a GPU is named by its vendor and PCI ids
(``NVIDIA 10DE:2236``) or its Tegra SoC, never by its driver or card number; the drive is the one under
the root filesystem, found by device number, never by its kernel name. ``lspci`` is a last resort, run
without a shell, and only against the live machine: boards and containers often lack it.

Every path is read under ``root``, so tests run against fixture trees. A piece that is missing or
unreadable gives an empty field, never an exception.
"""

import logging
import os
import re
import shlex
import subprocess

import security

__all__ = ["HardwareService", "collect_hardware"]

LINE_FORMAT = "CPU: {cpu}. GPU: {gpu}. Memory: {mem_kb}. DriveSerial: {serial}"

# Never rename an entry: accounts are bound to the resulting text. The order is the preference when a
# machine has several display devices: the compute GPU over an integrated one or a server's BMC VGA.
_PCI_VENDORS = (("10de", "NVIDIA"), ("1002", "AMD"), ("8086", "Intel"))
_VENDOR_RANK = {vendor: rank for rank, (vendor, _) in enumerate(_PCI_VENDORS)}
_VENDOR_NAME = dict(_PCI_VENDORS)
# Disks that are views of other disks or of memory; used only when nothing else has a serial.
_VIRTUAL_DISKS = ("loop", "ram", "zram", "dm-", "md", "nbd", "sr")
_DEVICE_TREE_DIRS = ("proc/device-tree", "sys/firmware/devicetree/base")
_MAX_READ = 1 << 20
_TOOL_TIMEOUT = 5
_STACK_DEPTH = 8

log = logging.getLogger(__name__)


cdef str _clean(value):
    """One field of a one-line string: no NULs, no control characters, no outer whitespace."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in value.replace("\0", "")).strip()


cdef str _hex(str raw):
    raw = raw.strip().lower()
    return raw[2:] if raw.startswith("0x") else raw


cdef class _Tree:
    """A filesystem root that every read stays inside, so a fixture tree can never leak the host's values."""

    cdef readonly str base
    cdef readonly bint live

    def __init__(self, root):
        self.base = os.path.realpath(os.fspath(root))
        self.live = self.base == os.path.realpath("/")

    cdef str path(self, str rel):
        return os.path.join(self.base, rel)

    cdef str resolve(self, str path):
        real = os.path.realpath(path)
        return real if os.path.commonpath((real, self.base)) == self.base else ""

    cdef bytes read(self, str path):
        real = self.resolve(path)
        if not real:
            return b""
        try:
            with open(real, "rb") as f:
                return f.read(_MAX_READ)
        except (OSError, ValueError):
            return b""

    cdef str text(self, str path):
        return self.read(path).decode("utf-8", "replace")

    cdef list listdir(self, str path):
        real = self.resolve(path)
        try:
            return sorted(os.listdir(real)) if real else []
        except OSError:
            return []

    cdef bytes device_tree(self, str name):
        for directory in _DEVICE_TREE_DIRS:
            data = self.read(self.path(os.path.join(directory, name)))
            if data:
                return data
        return b""


# --- CPU and memory -------------------------------------------------------------------------------

cdef dict _cpuinfo(_Tree tree):
    """First non-empty value of each key: every processor repeats the same model."""
    fields = {}
    for line in tree.text(tree.path("proc/cpuinfo")).splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and not fields.get(key):
            fields[key] = _clean(value)
    return fields


def _cpu(_Tree tree):
    info = _cpuinfo(tree)
    # x86 names the CPU; ARM kernels name only the board, in cpuinfo (Raspberry Pi) or the device tree.
    for key in ("model name", "Model", "Hardware"):
        if info.get(key):
            return info[key]
    model = _clean(tree.device_tree("model"))
    if model:
        return model
    ids = [f"{name} {info[key]}" for key, name in (("CPU implementer", "implementer"), ("CPU part", "part"))
           if info.get(key)]
    return " ".join(ids)


def _mem_kb(_Tree tree):
    match = re.search(r"^MemTotal:\s*([0-9]+)", tree.text(tree.path("proc/meminfo")), re.M)
    return match.group(1) if match else ""


# --- GPU ------------------------------------------------------------------------------------------

cdef tuple _pci_candidate(str vendor, str device, str address):
    """(preference, address, name): the smallest tuple is the machine's GPU."""
    name = f"{_VENDOR_NAME.get(vendor, '')} {vendor.upper()}:{device.upper()}".strip()
    return (_VENDOR_RANK.get(vendor, len(_PCI_VENDORS)), address, name)


cdef object _pci_display(_Tree tree, str dev):
    if not _hex(tree.text(os.path.join(dev, "class"))).startswith("03"):
        return None
    vendor = _hex(tree.text(os.path.join(dev, "vendor")))
    if not vendor:
        return None
    return _pci_candidate(vendor, _hex(tree.text(os.path.join(dev, "device"))), os.path.basename(dev))


cdef list _drm_devices(_Tree tree):
    drm = tree.path("sys/class/drm")
    cards = [name for name in tree.listdir(drm) if re.fullmatch(r"card[0-9]+", name)]
    devices = {tree.resolve(os.path.join(drm, card, "device")) for card in cards}
    return sorted(dev for dev in devices if dev and os.path.isdir(dev))


cdef str _tegra_gpu(_Tree tree):
    # The GPU is part of the SoC, present whatever drivers are loaded.
    for entry in tree.device_tree("compatible").split(b"\0"):
        match = re.fullmatch(rb"nvidia,tegra([0-9]+)", entry.strip())
        if match:
            return "NVIDIA Tegra" + match.group(1).decode("ascii")
    return ""


cdef str _pci_gpu(_Tree tree):
    # DRM cards and the PCI bus both count: a GPU whose driver is not loaded yet has no DRM card,
    # and the name must not change once it is.
    bus = tree.path("sys/bus/pci/devices")
    devices = _drm_devices(tree) + [tree.resolve(os.path.join(bus, name)) for name in tree.listdir(bus)]
    candidates = [c for c in (_pci_display(tree, dev) for dev in devices if dev) if c is not None]
    return min(candidates)[2] if candidates else ""


cdef str _platform_gpu(_Tree tree):
    """A DRM card on a SoC bus (Raspberry Pi, Rockchip), named by its device-tree compatible."""
    for dev in _drm_devices(tree):
        lines = tree.text(os.path.join(dev, "uevent")).splitlines()
        uevent = dict(line.partition("=")[::2] for line in lines)
        name = _clean(uevent.get("OF_COMPATIBLE_0") or uevent.get("DRIVER", ""))
        # The firmware framebuffer is a stand-in that disappears when the real driver loads.
        if name and "framebuffer" not in name and "simpledrm" not in name:
            return name
    return ""


cdef str _lspci_gpu(_Tree tree):
    if not tree.live:
        return ""  # a tool sees the machine it runs on, not the tree being read
    try:
        out = subprocess.run(["lspci", "-n", "-mm"], capture_output=True, text=True, timeout=_TOOL_TIMEOUT,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return ""
    candidates = []
    for line in out.splitlines():
        try:
            fields = shlex.split(line)
        except ValueError:
            continue
        if len(fields) >= 4 and fields[1].startswith("03"):
            candidates.append(_pci_candidate(fields[2].lower(), fields[3].lower(), fields[0]))
    return min(candidates)[2] if candidates else ""


def _gpu(_Tree tree):
    return _tegra_gpu(tree) or _pci_gpu(tree) or _platform_gpu(tree) or _lspci_gpu(tree)


# --- drive serial ---------------------------------------------------------------------------------

cdef str _vpd_serial(bytes page):
    """SCSI VPD page 0x80: 4 header bytes (the last two the length), then the serial."""
    if len(page) >= 4 and page[1] == 0x80:
        page = page[4:4 + int.from_bytes(page[2:4], "big")]
    return _clean(bytes(b for b in page if 0x20 <= b < 0x7F))


cdef str _disk_serial(_Tree tree, str block, int depth=0):
    if not block:
        return ""
    if os.path.isfile(os.path.join(block, "partition")):
        block = os.path.dirname(block)
    # LVM, LUKS and md sit on other block devices; the serial is the first real disk's underneath.
    slaves = tree.listdir(os.path.join(block, "slaves"))
    if slaves and depth < _STACK_DEPTH:
        return _disk_serial(tree, tree.resolve(os.path.join(block, "slaves", slaves[0])), depth + 1)
    device = os.path.join(block, "device")
    # The CID before serial: an eMMC/SD `serial` is only the 32-bit product number inside the CID.
    # NVMe keeps serial on the controller behind the namespace, virtio on the disk itself.
    for path in (os.path.join(device, "cid"), os.path.join(device, "serial"), os.path.join(block, "serial")):
        serial = _clean(tree.read(path))
        if serial:
            return serial
    return _vpd_serial(tree.read(os.path.join(device, "vpd_pg80")))


cdef list _mounts(_Tree tree):
    """(device dirs in /sys, mount point) of every mount, in mountinfo order."""
    mounts = []
    for line in tree.text(tree.path("proc/self/mountinfo")).splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        source_at = fields.index("-", 6) + 2
        dirs = []
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit() and major != "0":
            dirs.append(tree.path(f"sys/dev/block/{major}:{minor}"))
        # btrfs and some bind mounts report an anonymous device number; the source still names the disk.
        if source_at < len(fields) and fields[source_at].startswith("/dev/"):
            dirs.append(tree.path("sys/class/block/" + os.path.basename(fields[source_at])))
        mounts.append(([tree.resolve(d) for d in dirs], fields[4]))
    return mounts


cdef str _existing(list dirs):
    for d in dirs:
        if d and os.path.isdir(d):
            return d
    return ""


def _drive_serial(_Tree tree):
    mounts = _mounts(tree)
    root_dirs = [dirs for dirs, point in mounts if point == "/"]
    # The last mount on "/" is the one in effect; when it is a real disk, its serial is the answer.
    root = _existing(root_dirs[-1]) if root_dirs else ""
    if root:
        return _disk_serial(tree, root)
    # A container's overlay root: the host disk still shows through bind mounts (/etc/hosts, volumes).
    for dirs, _ in mounts:
        block = _existing(dirs)
        serial = _disk_serial(tree, block) if block else ""
        if serial:
            return serial
    sys_block = tree.path("sys/block")
    names = tree.listdir(sys_block)
    physical = [name for name in names if not name.startswith(_VIRTUAL_DISKS)]
    for name in physical + [name for name in names if name not in physical]:
        block = tree.resolve(os.path.join(sys_block, name))
        serial = _disk_serial(tree, block) if block else ""
        if serial:
            return serial
    return ""


# --- public ---------------------------------------------------------------------------------------

def collect_hardware(root="/"):
    """The hardware line of the machine (or fixture tree) at ``root``."""
    tree = _Tree(root)
    values = {}
    for field, reader in (("cpu", _cpu), ("gpu", _gpu), ("mem_kb", _mem_kb), ("serial", _drive_serial)):
        try:
            values[field] = _clean(reader(tree))
        except Exception:  # an unknown layout must cost one field, not the login
            log.warning("hardware: could not read %s", field, exc_info=True)
            values[field] = ""
    return LINE_FORMAT.format(**values)


cdef class HardwareService:
    """The machine's hardware line, read once: it does not change while the loader runs."""

    cdef readonly str root
    cdef str _hardware

    def __init__(self, root="/"):
        self.root = os.fspath(root)
        self._hardware = None

    @property
    def hardware(self):
        if self._hardware is None:
            self._hardware = collect_hardware(self.root)
        return self._hardware

    @property
    def hardware_hash(self):
        """Base64(SHA-384) of the line, as the API key derivation needs it (contract section 1)."""
        return security.hardware_hash(self.hardware)
