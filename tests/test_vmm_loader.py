"""The pieces of ``apicv boot`` that need no /dev/kvm: the multiboot ELF loader and the PC
devices (16550, isa-debug-exit, fw_cfg, pc-testdev)."""

from __future__ import annotations

import struct

import pytest
from elf_images import elf_image as _elf
from elf_images import mb_header as _mb_header
from hypothesis import given
from hypothesis import strategies as st

from apicv.vmm import multiboot as mb
from apicv.vmm.devices import FwCfg, PortBus, Serial16550

RAM = 32 << 20


@pytest.mark.parametrize("cls", [1, 2])
def test_pt_load_goes_to_paddr_with_bss_zeroed(cls):
    """Multiboot with flags bit 16 clear: the loader uses the ELF program headers; each
    PT_LOAD lands at p_paddr, memsz beyond filesz is zeroed (QEMU's multiboot ELF path)."""
    mem = bytearray(b"\xAA" * RAM)
    img = _elf(cls, [(0x200000, b"\x90" * 16, 0x40), (0x300000, b"data", 4)], entry=0x200004)
    k = mb.load(mem, RAM, img, path="k.elf", append="a b")
    assert mem[0x200000:0x200010] == b"\x90" * 16
    assert mem[0x200010:0x200040] == bytes(0x30)
    assert mem[0x300000:0x300004] == b"data"
    assert k.entry == 0x200004 and k.image_end == 0x300004
    assert k.registers == {"rip": 0x200004, "rax": 0x2BADB002, "rbx": mb.MBI_GPA, "rflags": 2}


def test_mbi_fields():
    """The MBI (Multiboot 0.6.96 section 3.3): flags MEM|CMDLINE|LOADER_NAME (+MODS with an
    initrd), mem_lower 640, mem_upper = KiB above 1 MiB, cmdline "KERNEL ARGS" as QEMU passes
    it, one module placed page-aligned after the image."""
    mem = bytearray(RAM)
    img = _elf(1, [(0x400000, b"\xc3", 0x1234)], entry=0x400000)
    k = mb.load(mem, RAM, img, path="x86/apic.flat", append="-v", initrd=b"NR_CPUS=2\n")
    flags, lower, upper, _boot, cmd, count, mods = struct.unpack_from("<7I", mem, k.mbi)
    assert flags == (mb.MULTIBOOT_INFO_MEMORY | mb.MULTIBOOT_INFO_CMDLINE
                     | mb.MULTIBOOT_INFO_MODS | mb.MULTIBOOT_INFO_BOOT_LOADER_NAME)
    assert (lower, upper) == (640, (RAM >> 10) - 1024)
    assert mem[cmd:mem.index(0, cmd)] == b"x86/apic.flat -v"
    start, end = struct.unpack_from("<2I", mem, mods)
    assert count == 1 and start == 0x402000 and start % 0x1000 == 0
    assert mem[start:end] == b"NR_CPUS=2\n" and k.module == (start, end)
    name = struct.unpack_from("<I", mem, k.mbi + 64)[0]
    assert mem[name:mem.index(0, name)] == b"apicv"


@pytest.mark.parametrize("case, message", [
    ("nomagic", "no multiboot header"),
    ("aout", "a.out kludge"),
    ("toobig", "does not fit"),
    ("mbi", "overlaps the loader's MBI area"),
    ("entry", "entry point"),
    ("notelf", "not an ELF"),
])
def test_bad_images_are_refused_with_a_reason(case, message):
    """A kernel the loader cannot honour is refused with a readable reason (BootImageError),
    before anything runs."""
    img = _elf(1, [(0x200000, b"x", 1)], entry=0x200000)
    if case == "nomagic":
        img = img.replace(_mb_header(), bytes(12))
    elif case == "aout":
        img = img.replace(_mb_header(), _mb_header(1 << 16))
    elif case == "toobig":
        img = _elf(1, [(RAM - 0x10, b"x", 0x100)], entry=RAM - 0x10)
    elif case == "mbi":
        img = _elf(1, [(0x8000, b"x", 0x2000)], entry=0x8000)
    elif case == "entry":
        img = _elf(1, [(0x200000, b"x", 1)], entry=0x500000)
    elif case == "notelf":
        img = _mb_header() + bytes(100)
    with pytest.raises(mb.BootImageError, match=message):
        mb.load(bytearray(RAM), RAM, img)


@given(st.integers(0, 8192 // 4 - 3).map(lambda i: i * 4))
def test_header_found_anywhere_in_the_first_8k(off):
    """The multiboot header is searched at every 4-byte boundary of the first 8 KiB."""
    img = bytearray(8192)
    img[off:off + 12] = _mb_header()
    assert mb.find_header(bytes(img)) == (off, 0)


def test_serial_dlab_and_output():
    """16550: with LCR.DLAB set, port +0/+1 are the divisor latch (a divisor write is not a
    character); LSR always says THRE|TEMT; THR writes go out."""
    got = []
    s = Serial16550(got.append)
    s.write(0x3FB, 0x80)
    s.write(0x3F8, 0x01)
    s.write(0x3F9, 0x00)
    s.write(0x3FB, 0x03)
    assert got == [] and (s.read(0x3F8 + 3), s.dll) == (3, 1)
    for c in b"ok\n":
        assert s.read(0x3FD) & 0x60 == 0x60
        s.write(0x3F8, c)
    assert b"".join(got) == b"ok\n"


def test_debug_exit_fw_cfg_and_testdev():
    """isa-debug-exit: status (value << 1) | 1; fw_cfg: 16-bit select of key 5 then byte
    reads give the CPU count (little endian), unknown keys read 0; pc-testdev: a write of v
    to 0x2000+n sets ISA line n to !!v; unclaimed ports read all ones."""
    exits, lines = [], []
    bus = PortBus(serial=Serial16550(lambda b: None), fw_cfg=FwCfg(3, RAM),
                  irq_line=lambda n, lv: lines.append((n, lv)), on_exit=exits.append)
    bus.write(0xF4, 4, 0)
    bus.write(0xF4, 4, 1)
    assert exits == [1, 3]
    bus.write(0x510, 2, 0x05)
    assert [bus.read(0x511, 1) for _ in range(3)] == [3, 0, 0]
    bus.write(0x510, 2, 0x03)
    assert int.from_bytes(bytes(bus.read(0x511, 1) for _ in range(8)), "little") == RAM
    bus.write(0x510, 2, 0x1234)
    assert bus.read(0x511, 1) == 0
    bus.write(0x200E, 1, 5)
    bus.write(0x200E, 1, 0)
    assert lines == [(14, 1), (14, 0)]
    assert bus.read(0x61, 1) == 0xFF and bus.read(0x1234, 2) == 0xFFFF
