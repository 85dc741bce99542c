"""Linux's x86 boot protocol without firmware (Documentation/arch/x86/boot.rst, "64-bit Boot
Protocol"), for a bzImage or an uncompressed vmlinux ELF:

* a **bzImage** (``HdrS`` setup header, protocol 2.12+ with XLF_KERNEL_64): its setup header
  is copied into the zero page; the vmlinux ELF it carries is decompressed by the VMM (xz,
  gzip, bzip2, lzma) and loaded as below, as the decompressor would; a payload Python cannot
  decompress goes with the protected-mode part to 1 MiB, entered 0x200 past it (the 64-bit
  entry: the decompressor then runs in the guest);
* a **vmlinux** (ELF64, no multiboot header): PT_LOAD segments at their physical addresses,
  the entry is ``e_entry`` (``phys_startup_64``), the zero page's header made from scratch
  (boot flag, ``HdrS``, version 2.15, loader type 0xFF) -- as Firecracker boots its guests.

Either way the zero page (``struct boot_params``) carries an e820 map (low RAM up to
0x9FC00, the BIOS area 0xF0000-0xFFFFF reserved for the MP table, RAM from 1 MiB), the
command line and the initrd (at the top of RAM below ``initrd_addr_max``); the vCPU starts in
64-bit mode with paging on (an identity map of the low 4 GiB with 2 MiB pages), a GDT whose
__BOOT_CS (0x10) and __BOOT_DS (0x18) are flat, interrupts off and RSI = the zero page. The
MP table (:mod:`apicv.vmm.mptable`) describes the CPUs and the IOAPIC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import mptable
from .multiboot import BootImageError, elf_segments, find_header

GDT_GPA = 0x500
PML4_GPA = 0x1000
PDPT_GPA = 0x2000
PD_GPA = 0x3000  # 4 pages: the low 4 GiB
ZERO_PAGE_GPA = 0x7000
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x10000
LOW_RAM_END = 0x9FC00
BIOS_START = 0xF0000
HIGH_RAM = 0x100000
BOOT_CS, BOOT_DS = 0x10, 0x18
E820_RAM, E820_RESERVED = 1, 2

# struct boot_params / struct setup_header offsets
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_HDR = 0x1F1
HDR_SETUP_SECTS = 0x1F1
HDR_VID_MODE = 0x1FA
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PAYLOAD_OFFSET = 0x248
HDR_INIT_SIZE = 0x260
BP_E820_TABLE = 0x2D0
E820_MAX = 128
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
BZIMAGE_LOAD = 0x100000


@dataclass(frozen=True)
class LinuxKernel:
    """What :func:`load` did."""

    kind: str  # "bzImage" or "vmlinux"
    entry: int
    boot_params: int
    cmdline: str
    initrd: tuple[int, int] | None
    version: str  # the kernel's version string, if found

    @property
    def registers(self) -> dict[str, int]:
        """The general registers at the 64-bit entry: RSI = the zero page, IF clear."""
        return {"rip": self.entry, "rsi": self.boot_params, "rflags": 2}


def kind(image: bytes) -> str | None:
    """"bzImage", "vmlinux" (an x86-64 ELF without a multiboot header) or None."""
    if len(image) > 0x264 and image[HDR_HEADER:HDR_HEADER + 4] == b"HdrS":
        return "bzImage"
    if len(image) >= 64 and image[:4] == b"\x7fELF" and image[4] == 2:
        try:
            find_header(image)
        except BootImageError:
            return "vmlinux"
    return None


def _version(image: bytes, k: str) -> str:
    if k == "bzImage":
        off = struct.unpack_from("<H", image, 0x20E)[0] + 0x200
        end = image.find(b"\0", off, off + 256)
        if 0x200 < off < len(image) and end > off:
            return image[off:end].decode(errors="replace")
        return ""
    i = image.find(b"Linux version ")
    if i < 0:
        return ""
    end = image.find(b"\n", i, i + 512)
    return image[i + 14:end if end > 0 else i + 200].split(b" (")[0].decode(errors="replace")


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    return [(0, LOW_RAM_END, E820_RAM),
            (LOW_RAM_END, 0xA0000 - LOW_RAM_END, E820_RESERVED),
            (BIOS_START, HIGH_RAM - BIOS_START, E820_RESERVED),
            (HIGH_RAM, ram_size - HIGH_RAM, E820_RAM)]


def _page_tables(mem) -> None:
    """Identity map of the low 4 GiB: PML4[0] -> PDPT, PDPT[i] -> PD i, 2 MiB pages."""
    mem[PML4_GPA:PD_GPA + 4 * 0x1000] = bytes(PD_GPA + 4 * 0x1000 - PML4_GPA)
    struct.pack_into("<Q", mem, PML4_GPA, PDPT_GPA | 0x3)
    for i in range(4):
        struct.pack_into("<Q", mem, PDPT_GPA + 8 * i, (PD_GPA + 0x1000 * i) | 0x3)
    pd = struct.pack("<2048Q", *(((i << 21) | 0x83) for i in range(2048)))
    mem[PD_GPA:PD_GPA + len(pd)] = pd


def _gdt(mem) -> None:
    # null, null, __BOOT_CS: 64-bit code, __BOOT_DS: flat data
    struct.pack_into("<4Q", mem, GDT_GPA, 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)


def _load_elf(mem, ram_size: int, image: bytes) -> tuple[int, int]:
    """PT_LOAD segments at their physical addresses: (entry, end of the highest one)."""
    entry, segs = elf_segments(image)
    image_end = 0
    for off, s in segs:
        if s.paddr < HIGH_RAM or s.paddr + s.memsz > ram_size:
            raise BootImageError(f"segment at {s.paddr:#x} (+{s.memsz:#x}) does not fit "
                                 f"in {ram_size >> 20} MiB of RAM above 1 MiB: use --memory")
        mem[s.paddr:s.paddr + s.filesz] = image[off:off + s.filesz]
        mem[s.paddr + s.filesz:s.paddr + s.memsz] = bytes(s.memsz - s.filesz)
        image_end = max(image_end, s.paddr + s.memsz)
    if not any(s.paddr <= entry < s.paddr + s.memsz for _o, s in segs):
        raise BootImageError(f"entry point {entry:#x} is not in a loaded segment "
                             "(a vmlinux's e_entry is phys_startup_64)")
    return entry, image_end


def payload_elf(image: bytes) -> bytes | None:
    """The vmlinux ELF a bzImage carries (``payload_offset``/``payload_length``, protocol
    2.08+), decompressed here if Python can (xz, gzip, bzip2, legacy lzma); None otherwise."""
    if struct.unpack_from("<H", image, HDR_VERSION)[0] < 0x208:
        return None
    setup_sects = image[HDR_SETUP_SECTS] or 4
    off, length = struct.unpack_from("<II", image, HDR_PAYLOAD_OFFSET)
    start = (setup_sects + 1) * 512 + off
    data = image[start:start + length]
    try:
        if data.startswith(b"\xfd7zXZ\x00") or data.startswith(b"\x5d\x00\x00"):
            import lzma
            out = lzma.LZMADecompressor().decompress(data)
        elif data.startswith(b"\x1f\x8b"):
            import zlib
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        elif data.startswith(b"BZh"):
            import bz2
            out = bz2.BZ2Decompressor().decompress(data)
        else:
            return None
    except (OSError, EOFError, ValueError):
        return None
    return out if out[:4] == b"\x7fELF" else None


def load(mem, ram_size: int, image: bytes, *, append: str = "", initrd: bytes | None = None,
         nr_cpus: int = 1, cpu_signature: int = 0x600) -> LinuxKernel:
    """Load the bzImage or vmlinux *image*, build the zero page, the MP table, the page
    tables and the GDT in *mem*; raises :class:`BootImageError` if something does not fit."""
    k = kind(image)
    if k is None:
        raise BootImageError("not a Linux bzImage or x86-64 vmlinux")
    if ram_size < 32 << 20:
        raise BootImageError(f"{ram_size >> 20} MiB of RAM is too little for Linux "
                             "(at least 32 MiB)")
    bp = bytearray(0x1000)
    if k == "bzImage":
        version = struct.unpack_from("<H", image, HDR_VERSION)[0]
        if version < 0x20C:
            raise BootImageError(f"boot protocol {version >> 8}.{version & 0xFF}: the 64-bit "
                                 "entry needs 2.12 or later")
        if not image[HDR_XLOADFLAGS] & XLF_KERNEL_64:
            raise BootImageError("this bzImage has no 64-bit entry (XLF_KERNEL_64 clear)")
        hdr_end = HDR_HEADER + image[HDR_JUMP + 1]
        bp[BP_HDR:hdr_end] = image[BP_HDR:hdr_end]
        setup_sects = image[HDR_SETUP_SECTS] or 4
        pm = image[(setup_sects + 1) * 512:]
        elf = payload_elf(image)
        if elf is not None:
            # what the decompressor would do, done here (in the guest it runs in this host's
            # instruction emulator for many minutes): the vmlinux ELF it carries, entered at
            # startup_64 with the bzImage's setup header in the zero page
            entry, image_end = _load_elf(mem, ram_size, elf)
        else:
            init_size = struct.unpack_from("<I", image, HDR_INIT_SIZE)[0]
            align = struct.unpack_from("<I", image, HDR_KERNEL_ALIGNMENT)[0] or 0x200000
            need = max(BZIMAGE_LOAD + len(pm), 0x1000000 + init_size + align)
            if need > ram_size:
                raise BootImageError(f"this bzImage needs {need >> 20} MiB of RAM to "
                                     f"decompress (init_size {init_size >> 20} MiB): use "
                                     "--memory")
            mem[BZIMAGE_LOAD:BZIMAGE_LOAD + len(pm)] = pm
            entry = BZIMAGE_LOAD + 0x200
            image_end = BZIMAGE_LOAD + len(pm)
        cmdline_size = struct.unpack_from("<I", image, HDR_CMDLINE_SIZE)[0] or 255
        initrd_max = struct.unpack_from("<I", image, HDR_INITRD_ADDR_MAX)[0] or 0x37FFFFFF
    else:
        entry, image_end = _load_elf(mem, ram_size, image)
        struct.pack_into("<H", bp, HDR_BOOT_FLAG, 0xAA55)
        bp[HDR_HEADER:HDR_HEADER + 4] = b"HdrS"
        struct.pack_into("<H", bp, HDR_VERSION, 0x20F)
        struct.pack_into("<I", bp, HDR_KERNEL_ALIGNMENT, 0x1000000)
        cmdline_size = CMDLINE_MAX - 1
        initrd_max = 0x7FFFFFFF
    cmd = append.encode()
    if len(cmd) > min(cmdline_size, CMDLINE_MAX - 1):
        raise BootImageError(f"command line too long ({len(cmd)} bytes, the kernel takes "
                             f"{cmdline_size})")
    mem[CMDLINE_GPA:CMDLINE_GPA + len(cmd) + 1] = cmd + b"\0"
    struct.pack_into("<H", bp, HDR_VID_MODE, 0xFFFF)
    bp[HDR_TYPE_OF_LOADER] = 0xFF
    bp[HDR_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, CMDLINE_GPA)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, 0)
    rd = None
    if initrd:
        top = min(ram_size, initrd_max + 1)
        start = (top - len(initrd)) & ~0xFFF
        if start < image_end:
            raise BootImageError(f"initrd ({len(initrd)} bytes) does not fit between the "
                                 f"kernel and {top:#x}")
        mem[start:start + len(initrd)] = initrd
        rd = (start, start + len(initrd))
        struct.pack_into("<II", bp, HDR_RAMDISK_IMAGE, start, len(initrd))
    e820 = e820_map(ram_size)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, typ) in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, addr, size, typ)
    mem[ZERO_PAGE_GPA:ZERO_PAGE_GPA + len(bp)] = bytes(bp)
    mp = mptable.build(nr_cpus, cpu_signature=cpu_signature, base=BIOS_START)
    mem[BIOS_START:BIOS_START + len(mp)] = mp
    _page_tables(mem)
    _gdt(mem)
    return LinuxKernel(kind=k, entry=entry, boot_params=ZERO_PAGE_GPA, cmdline=append,
                       initrd=rd, version=_version(image, k))
