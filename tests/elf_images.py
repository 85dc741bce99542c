"""Tiny multiboot ELF images for the ``apicv boot`` tests (no compiler needed)."""

from __future__ import annotations

import struct

from apicv.vmm import multiboot as mb


def mb_header(flags: int = 0) -> bytes:
    return struct.pack("<3I", mb.MULTIBOOT_HEADER_MAGIC, flags,
                       (-(mb.MULTIBOOT_HEADER_MAGIC + flags)) & 0xFFFFFFFF)


def elf_image(cls: int, segments: list[tuple[int, bytes, int]], entry: int,
         header_at: int = 0x100) -> bytes:
    """A minimal ELF (class 1 or 2) whose PT_LOADs are (paddr, file bytes, memsz); the
    multiboot header is put at file offset *header_at*."""
    if cls == 1:
        ehsize, phentsize = 52, 32
    else:
        ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = 0x1000
    body = bytearray(data_off)
    body[header_at:header_at + 12] = mb_header()
    phdrs = b""
    for paddr, blob, memsz in segments:
        off = len(body)
        body += blob
        if cls == 1:
            phdrs += struct.pack("<8I", 1, off, paddr, paddr, len(blob), memsz, 7, 0x1000)
        else:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, paddr, paddr, len(blob), memsz, 0x1000)
    ident = b"\x7fELF" + bytes((cls, 1, 1)) + bytes(9)
    if cls == 1:
        eh = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, phoff, 0, 0, ehsize,
                                 phentsize, len(segments), 40, 0, 0)
    else:
        eh = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, ehsize,
                                 phentsize, len(segments), 64, 0, 0)
    body[0:len(eh)] = eh
    body[phoff:phoff + len(phdrs)] = phdrs
    return bytes(body)
