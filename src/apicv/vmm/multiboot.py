"""Multiboot (v1) ELF loading, as QEMU's ``-kernel`` multiboot loader does it for a kernel whose
header has no address fields (flags bit 16 clear): PT_LOAD segments of an ELF32 or ELF64
image go to their physical addresses (``p_paddr``) with the bss zeroed, one module (the
initrd) is placed page-aligned after the image, and the multiboot information structure (MBI)
gives flags, mem_lower/mem_upper, the command line ("KERNEL ARGS", like QEMU) and the module.

The entry contract (Multiboot 0.6.96 section 3.2): EAX = 0x2BADB002, EBX = the MBI's physical
address, 32-bit protected mode with paging off and flat 4 GiB code and data segments.
:func:`load` only writes memory and returns where things went; the VMM sets the registers.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from ..errors import ApicvError

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192  # the header lies in the first 8 KiB, 4-byte aligned
MULTIBOOT_AOUT_KLUDGE = 1 << 16
# struct multiboot_info flags
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_INFO_CMDLINE = 1 << 2
MULTIBOOT_INFO_MODS = 1 << 3
MULTIBOOT_INFO_BOOT_LOADER_NAME = 1 << 9

# where the loader puts its own data (below the EBDA, above the real-mode IVT/BDA and the
# page an AP trampoline usually takes): the MBI, the module list, then the strings
MBI_GPA = 0x9000
MODS_GPA = MBI_GPA + 0x80
STRINGS_GPA = MBI_GPA + 0x100
STRINGS_END = 0x9F000
LOWMEM_KB = 640

PT_LOAD = 1
ELFCLASS32 = 1
ELFCLASS64 = 2
EM_386 = 3
EM_X86_64 = 62


class BootImageError(ApicvError):
    """The kernel (or initrd) cannot be loaded: the message says why."""


@dataclass(frozen=True)
class Segment:
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class LoadedKernel:
    """What :func:`load` did: entry point, MBI address, and the memory it used."""

    entry: int
    mbi: int
    segments: tuple[Segment, ...]
    image_end: int  # first byte after the highest segment
    module: tuple[int, int] | None  # [start, end) of the initrd
    cmdline: str

    @property
    def registers(self) -> dict[str, int]:
        """The general registers at entry (Multiboot: EAX magic, EBX the MBI)."""
        return {"rip": self.entry, "rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": self.mbi,
                "rflags": 2}


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def read_image(path: str, what: str, limit: int) -> bytes:
    """The contents of the regular file *path* (a kernel or an initrd, *what* names it in
    errors), at most *limit* bytes: a directory, a device, a FIFO or a socket is refused
    before it is opened for reading (a FIFO would block, /dev/zero never ends), and so is a
    file larger than *limit* (nothing bigger than the guest's RAM can be loaded)."""
    def fail(msg: str) -> BootImageError:
        return BootImageError(f"{what} {path}: {msg}")

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise fail(f"not a regular file ({_kind(st.st_mode)})")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)  # the file opened may not be the one looked at
            if not stat.S_ISREG(st.st_mode):
                raise fail(f"not a regular file ({_kind(st.st_mode)})")
            if st.st_size > limit:
                raise fail(f"{st.st_size} bytes, larger than the {limit >> 20} MiB that "
                           "can be loaded")
            chunks = []
            size = 0
            while True:
                b = os.read(fd, min(1 << 20, limit + 1 - size))
                if not b:
                    break
                chunks.append(b)
                size += len(b)
                if size > limit:
                    raise fail(f"larger than the {limit >> 20} MiB that can be loaded")
        finally:
            os.close(fd)
    except OSError as e:
        raise fail(e.strerror or str(e)) from None
    return b"".join(chunks)


def find_header(image: bytes) -> tuple[int, int]:
    """(offset, flags) of the multiboot header: magic, flags and a checksum that makes the
    three words add up to 0, 4-byte aligned within the first 8 KiB."""
    limit = min(len(image), MULTIBOOT_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<3I", image, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    raise BootImageError("no multiboot header (magic 0x1BADB002 with a valid checksum) in the "
                         "first 8 KiB")


def elf_segments(image: bytes) -> tuple[int, list[tuple[int, Segment]]]:
    """(entry, [(file offset, Segment)]) of an ELF32/ELF64 x86 executable's PT_LOADs."""
    if len(image) < 52 or image[:4] != b"\x7fELF":
        raise BootImageError("not an ELF file (multiboot kernels must be ELF without the "
                             "a.out kludge)")
    cls, data = image[4], image[5]
    if data != 1:
        raise BootImageError("ELF is not little-endian")
    if cls == ELFCLASS32:
        machine, _ver, entry, phoff = struct.unpack_from("<HIII", image, 18)
        phentsize, phnum = struct.unpack_from("<HH", image, 42)
        fmt, need = "<8I", 32
    elif cls == ELFCLASS64:
        if len(image) < 64:
            raise BootImageError("ELF64 header truncated")
        machine, _ver, entry, phoff = struct.unpack_from("<HIQQ", image, 18)
        phentsize, phnum = struct.unpack_from("<HH", image, 54)
        fmt, need = "<IIQQQQQQ", 56
    else:
        raise BootImageError(f"unknown ELF class {cls}")
    if machine not in (EM_386, EM_X86_64):
        raise BootImageError(f"ELF machine {machine} is not x86")
    if phentsize < need or phoff + phnum * phentsize > len(image):
        raise BootImageError("ELF program headers are truncated")
    out = []
    for i in range(phnum):
        f = struct.unpack_from(fmt, image, phoff + i * phentsize)
        if cls == ELFCLASS32:
            p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = f[:6]
        else:
            p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = f[:7]
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(image):
            raise BootImageError(f"PT_LOAD {i} lies outside the file (offset {p_offset:#x}, "
                                 f"filesz {p_filesz:#x})")
        out.append((p_offset, Segment(p_paddr, p_filesz, p_memsz)))
    if not out:
        raise BootImageError("ELF has no PT_LOAD segment")
    return entry, out


def load(mem, ram_size: int, image: bytes, *, path: str = "kernel", append: str = "",
         initrd: bytes | None = None) -> LoadedKernel:
    """Load *image* into *mem* (a writable buffer indexed by guest-physical address, at least
    *ram_size* bytes) and build the MBI; raises :class:`BootImageError` if it does not fit."""
    if ram_size < 0x200000:
        raise BootImageError(f"{ram_size >> 20} MiB of RAM is too little (at least 2 MiB)")
    _off, flags = find_header(image)
    if flags & MULTIBOOT_AOUT_KLUDGE:
        raise BootImageError("multiboot header asks for the a.out kludge (flags bit 16): only "
                             "ELF program headers are loaded")
    entry, segs = elf_segments(image)
    end = 0
    for off, s in segs:
        if s.paddr + s.memsz > ram_size:
            raise BootImageError(f"segment at {s.paddr:#x} (+{s.memsz:#x}) does not fit in "
                                 f"{ram_size >> 20} MiB of RAM")
        if s.paddr < STRINGS_END and s.paddr + s.memsz > MBI_GPA:
            raise BootImageError(f"segment at {s.paddr:#x} overlaps the loader's MBI area "
                                 f"[{MBI_GPA:#x}, {STRINGS_END:#x})")
        mem[s.paddr:s.paddr + s.filesz] = image[off:off + s.filesz]
        mem[s.paddr + s.filesz:s.paddr + s.memsz] = bytes(s.memsz - s.filesz)
        end = max(end, s.paddr + s.memsz)
    if not any(s.paddr <= entry < s.paddr + s.memsz for _o, s in segs):
        raise BootImageError(f"entry point {entry:#x} is not in a loaded segment")
    cmdline = f"{path} {append}".rstrip() if append else path
    strings = cmdline.encode() + b"\0"
    loader_name = b"apicv\0"
    cmd_gpa = STRINGS_GPA
    name_gpa = cmd_gpa + len(strings)
    if name_gpa + len(loader_name) > STRINGS_END:
        raise BootImageError(f"command line too long ({len(strings)} bytes)")
    mem[cmd_gpa:cmd_gpa + len(strings)] = strings
    mem[name_gpa:name_gpa + len(loader_name)] = loader_name
    mbi_flags = MULTIBOOT_INFO_MEMORY | MULTIBOOT_INFO_CMDLINE | MULTIBOOT_INFO_BOOT_LOADER_NAME
    module = None
    mods_count = mods_addr = 0
    if initrd is not None:
        start = (end + 0xFFF) & ~0xFFF
        if start + len(initrd) > ram_size:
            raise BootImageError(f"initrd ({len(initrd)} bytes) does not fit after the kernel")
        mem[start:start + len(initrd)] = initrd
        module = (start, start + len(initrd))
        # struct multiboot_mod_list: mod_start, mod_end, cmdline, pad
        struct.pack_into("<4I", mem, MODS_GPA, start, start + len(initrd), 0, 0)
        mbi_flags |= MULTIBOOT_INFO_MODS
        mods_count, mods_addr = 1, MODS_GPA
    mem_upper = max(0, ram_size - 0x100000) // 1024
    mbi = bytearray(0x58)
    struct.pack_into("<IIIIIII", mbi, 0, mbi_flags, LOWMEM_KB, mem_upper, 0, cmd_gpa,
                     mods_count, mods_addr)
    struct.pack_into("<I", mbi, 64, name_gpa)  # boot_loader_name
    mem[MBI_GPA:MBI_GPA + len(mbi)] = mbi
    return LoadedKernel(entry=entry, mbi=MBI_GPA,
                        segments=tuple(s for _o, s in segs), image_end=end, module=module,
                        cmdline=cmdline)
