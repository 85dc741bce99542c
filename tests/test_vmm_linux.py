"""`apicv boot` runs Linux: the loader pieces (boot protocol, MP table, the interrupt-driven
16550, the port bus) without KVM, and -- when `make linux` has built the minimal kernel and its
busybox initramfs (in $APICV_LINUX_DIR, default /var/cache/apicv/linux) -- a 2-vCPU boot to
init with the model as the whole interrupt controller. That boot is skipped, with the
reason, where the kernel was not built (`make test` builds it first where it can: root with
apt; a failed build only skips this test).

On this host the guest kernel runs in KVM's instruction emulator (host-kvm-notes 11-12), so
the boot takes minutes; the workload is kept small (apicv.rounds=30)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from apicv.vmm import linux, mptable
from apicv.vmm.devices import Cmos, FwCfg, LinuxPortBus, Uart16550

ROOT = Path(__file__).resolve().parent.parent
LINUX_DIR = Path(os.environ.get("APICV_LINUX_DIR", "/var/cache/apicv/linux"))
BOOT_TIMEOUT = 900


# ---------------------------------------------------------------- no KVM needed
def test_mptable_checksums_and_entries():
    blob = mptable.build(4, base=0xF0000)
    assert blob[:4] == b"_MP_" and sum(blob[:16]) & 0xFF == 0
    assert struct.unpack_from("<I", blob, 4)[0] == 0xF0010
    table = blob[16:]
    length, count = struct.unpack_from("<H", table, 4)[0], struct.unpack_from("<H", table, 34)[0]
    assert table[:4] == b"PCMP" and len(table) == length and sum(table) & 0xFF == 0
    off, kinds, cpus = 44, [], []
    for _ in range(count):
        kinds.append(table[off])
        if table[off] == mptable.MP_PROCESSOR:
            cpus.append((table[off + 1], table[off + 3]))
        off += 20 if table[off] == mptable.MP_PROCESSOR else 8
    assert off == length
    assert cpus == [(0, 3), (1, 1), (2, 1), (3, 1)]  # BSP flagged, APIC ID = vCPU id
    assert kinds.count(mptable.MP_INTSRC) == 16  # ExtINT + ISA IRQs 0-15 but 2
    assert mptable.isa_pin(0) == 2 and mptable.isa_pin(4) == 4


def _fake_vmlinux() -> bytes:
    """An ELF64 with one PT_LOAD of 0x100 bytes at 16 MiB, entry at its start."""
    eh = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7, 2, 62, 1,
                     0x1000000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0xFFFFFFFF81000000, 0x1000000, 0x100, 0x200,
                     0x1000)
    img = bytearray(0x1100)
    img[:len(eh)] = eh
    img[64:64 + len(ph)] = ph
    img[0x1000:0x1100] = b"\x90" * 0x100
    return bytes(img)


def test_vmlinux_zero_page_e820_cmdline_initrd():
    ram = 64 << 20
    mem = bytearray(ram)
    img = _fake_vmlinux()
    assert linux.kind(img) == "vmlinux"
    k = linux.load(mem, ram, img, append="console=ttyS0", initrd=b"RD" * 100, nr_cpus=2)
    assert k.kind == "vmlinux" and k.entry == 0x1000000
    assert k.registers == {"rip": 0x1000000, "rsi": linux.ZERO_PAGE_GPA, "rflags": 2}
    zp = linux.ZERO_PAGE_GPA
    assert mem[zp + linux.HDR_HEADER:zp + linux.HDR_HEADER + 4] == b"HdrS"
    assert struct.unpack_from("<H", mem, zp + linux.HDR_BOOT_FLAG)[0] == 0xAA55
    assert mem[zp + linux.HDR_TYPE_OF_LOADER] == 0xFF
    cmd = struct.unpack_from("<I", mem, zp + linux.HDR_CMD_LINE_PTR)[0]
    assert mem[cmd:cmd + 14] == b"console=ttyS0\0"
    rd, rdsize = struct.unpack_from("<II", mem, zp + linux.HDR_RAMDISK_IMAGE)
    assert rdsize == 200 and rd % 0x1000 == 0 and rd + rdsize <= ram and mem[rd:rd + 2] == b"RD"
    n = mem[zp + linux.BP_E820_ENTRIES]
    e820 = [struct.unpack_from("<QQI", mem, zp + linux.BP_E820_TABLE + 20 * i) for i in range(n)]
    assert (0x100000, ram - 0x100000, 1) in e820 and (0xF0000, 0x10000, 2) in e820
    assert mem[0x1000000:0x1000100] == b"\x90" * 0x100 and mem[0x1000100:0x1000200] == bytes(256)
    assert mem[0xF0000:0xF0004] == b"_MP_"
    # identity map: PML4[0] -> PDPT, PD entry 8 maps 16 MiB with a 2 MiB page
    assert struct.unpack_from("<Q", mem, linux.PML4_GPA)[0] == linux.PDPT_GPA | 3
    assert struct.unpack_from("<Q", mem, linux.PD_GPA + 8 * 8)[0] == (8 << 21) | 0x83


def test_bzimage_header_checks():
    img = bytearray(0x4000)
    img[0x1F1] = 1  # setup_sects
    img[0x201] = 0x66  # the header runs to 0x268
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20B)
    assert linux.kind(bytes(img)) == "bzImage"
    with pytest.raises(linux.BootImageError, match="2.12"):
        linux.load(bytearray(64 << 20), 64 << 20, bytes(img))
    struct.pack_into("<H", img, 0x206, 0x20F)
    with pytest.raises(linux.BootImageError, match="64-bit entry"):
        linux.load(bytearray(64 << 20), 64 << 20, bytes(img))
    img[0x236] = 1
    struct.pack_into("<I", img, 0x260, 0x100000)  # init_size
    mem = bytearray(64 << 20)
    k = linux.load(mem, 64 << 20, bytes(img), append="x")
    assert k.entry == 0x100200 and mem[0x100000:0x100010] == bytes(img[0x400:0x410])
    assert mem[linux.ZERO_PAGE_GPA + 0x206] == 0x0F  # the kernel's header was copied


def test_uart_thre_interrupt_and_loopback():
    levels, out = [], bytearray()
    u = Uart16550(out.extend, levels.append)
    u.write(0x3FC, 0x08)  # MCR.OUT2: the IRQ reaches the line
    u.write(0x3F9, 0x02)  # IER.THRI: THR is empty, so an interrupt at once
    assert levels == [1] and u.read(0x3FA) & 0x0F == 0x02
    assert levels == [1, 0] and u.read(0x3FA) & 0x0F == 0x01  # reading IIR acknowledged it
    u.write(0x3F8, ord("A"))
    assert out == b"A" and levels == [1, 0, 1]
    u.write(0x3F9, 0)
    assert levels[-1] == 0
    u.write(0x3FC, 0x10 | 0x0A)  # loopback with RTS and OUT2: MSR shows CTS and DCD
    assert u.read(0x3FE) & 0xF0 == 0x90
    u.write(0x3F8, 0x55)
    assert u.read(0x3FD) & 1 and u.read(0x3F8) == 0x55 and out == b"A"


def test_port_bus_cmos_and_reset():
    resets = []
    u = Uart16550(lambda b: None, lambda lv: None)
    bus = LinuxPortBus(serial=u, fw_cfg=FwCfg(1, 1 << 27), irq_line=lambda i, lv: None,
                       on_exit=lambda s: None, cmos=Cmos(lambda: 0.0),
                       on_reset=lambda: resets.append(1))
    bus.write(0x70, 1, 0x0A)
    assert bus.read(0x71, 1) & 0x80 == 0  # no update in progress
    bus.write(0x70, 1, 0x32)
    assert bus.read(0x71, 1) == 0x19  # the century, BCD
    assert bus.read(0xCFC, 4) == 0xFFFFFFFF  # no PCI
    bus.write(0x64, 1, 0xFE)
    assert resets == [1]


# ---------------------------------------------------------------- the real kernel
def _why_not_linux() -> str | None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is absent or not accessible"
    for f in ("vmlinux", "initramfs.cpio"):
        if not (LINUX_DIR / f).is_file():
            return (f"{LINUX_DIR / f} not built: run `make linux` (builds Debian's "
                    "linux-source-6.1 with guests/linux/apicv.config, ~5 min on 2 cores)")
    return None


def _tables(out: str) -> list[dict[str, list[int]]]:
    """The /proc/interrupts tables the init printed: {name: [count per CPU]}."""
    tables = []
    for block in re.findall(r"^ +CPU0[^\n]*\n((?:[ \w]+:[^\n]*\n)+)", out, re.M):
        t = {}
        for line in block.splitlines():
            name, rest = line.split(":", 1)
            counts = []
            for tok in rest.split():
                if not tok.isdigit():
                    break
                counts.append(int(tok))
            key = "ttyS0" if "ttyS0" in rest else name.strip()
            t[key] = counts
        tables.append(t)
    return tables


@pytest.mark.kvm
@pytest.mark.skipif(_why_not_linux() is not None, reason=_why_not_linux() or "")
def test_linux_boots_smp2_on_the_model():
    cmd = [sys.executable, "-m", "apicv.cli", "boot", str(LINUX_DIR / "vmlinux"),
           "--initrd", str(LINUX_DIR / "initramfs.cpio"), "--smp", "2", "--irqchip", "model",
           "--append", "console=ttyS0 reboot=k panic=-1 tsc=reliable apicv.rounds=30",
           "--timeout", str(BOOT_TIMEOUT)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60,
                       cwd=ROOT, errors="replace")
    out = r.stdout
    assert r.returncode == 0, f"status {r.returncode}: {r.stderr[-2000:]}\n{out[-3000:]}"
    assert "Run /init as init process" in out and "apicv-init: done" in out
    assert "smp: Brought up 1 node, 2 CPUs" in out
    for bad in ("lost interrupt", "stall", "Spurious interrupt", "APIC error", "BUG:",
                "WARNING:", "segfault"):
        hits = [ln for ln in out.splitlines() if bad in ln and not ln.startswith("SPU:")]
        assert not hits, hits
    before, after = _tables(out)[-2:]
    for cpu in (0, 1):
        assert after["LOC"][cpu] > before["LOC"][cpu] > 0, (before["LOC"], after["LOC"])
        ipis = [after[k][cpu] - before[k][cpu] for k in ("RES", "CAL")]
        assert sum(ipis) > 0, (cpu, ipis)
    assert after["SPU"] == [0, 0] and after["ERR"] == [0]
    # the console works by interrupts: IRQ 4 through the model's IOAPIC
    assert sum(after["ttyS0"]) > sum(before["ttyS0"]) > 0


def test_host_cmdline_merges_clearcpuid():
    from apicv.vmm.linuxboot import HOST_APPEND, host_cmdline

    assert host_cmdline("console=ttyS0") == f"console=ttyS0 {HOST_APPEND}"
    out = host_cmdline("console=ttyS0 clearcpuid=129,151 quiet").split()
    assert [w for w in out if w.startswith("clearcpuid=")] == ["clearcpuid=129,151,308,141"]
    assert "quiet" in out and "noxsave" in out
