"""Guest physical memory as the VM's memslots describe it.

KVM maps the VAPIC word (KVM_SET_VAPIC_ADDR) and the PV-EOI byte (MSR_KVM_PV_EOI_EN) through a
``gfn_to_hva_cache``: the address must lie in a writable memslot, else the ioctl fails with
EINVAL (VAPIC) or the WRMSR takes #GP (PV EOI). Both backends use the same layout, so that the
same addresses are valid on the model and on the real KVM:

* RAM is one writable memslot ``[RAM_START, RAM_END)``; guest page 0 stays unbacked so that an
  APIC base of 0 reaches the LAPIC's MMIO window.
* ``SCRATCH_GPA`` .. ``SCRATCH_GPA + SCRATCH_SIZE`` is RAM that neither backend uses for itself:
  put VAPIC words and PV-EOI bytes there (the KVM backend's guest agent lives elsewhere).

The model stores RAM sparsely (4 KiB pages allocated on first write), reading zeros elsewhere.
"""

from __future__ import annotations

RAM_START = 0x1000
RAM_END = 0x1100000  # the KVM backend's RAM memslot ends here (per-vCPU mailboxes below it)
ROM_START = 0xFFFF0000  # the KVM backend's read-only memslot (reset vector page)
ROM_END = 0x100000000
SCRATCH_GPA = 0x80000
SCRATCH_SIZE = 0x20000
PAGE = 0x1000


def in_ram(gpa: int, size: int) -> bool:
    """True if [gpa, gpa + size) lies in the RAM memslot (kvm_gfn_to_hva_cache_init succeeds)."""
    return gpa >= RAM_START and gpa + size <= RAM_END and size >= 0


def in_memslot(gpa: int, size: int) -> bool:
    """True if every byte of [gpa, gpa + size) is in a memslot, read-only ones included
    (kvm_gfn_to_hva_cache_init succeeds: KVM_SET_VAPIC_ADDR and MSR_KVM_PV_EOI_EN accept
    it; seen on this host for the ROM slot)."""
    return in_ram(gpa, size) or (gpa >= ROM_START and gpa + size <= ROM_END)


class GuestMemory:
    """The model's guest RAM: kvm_read_guest / kvm_write_guest over the RAM memslot."""

    __slots__ = ("_pages",)

    def __init__(self) -> None:
        self._pages: dict[int, bytearray] = {}

    def read(self, gpa: int, size: int) -> bytes:
        """kvm_read_guest(); ValueError outside RAM (KVM returns -EFAULT)."""
        if not in_ram(gpa, size):
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM")
        out = bytearray()
        while size:
            page = self._pages.get(gpa >> 12)
            off = gpa & (PAGE - 1)
            n = min(size, PAGE - off)
            out += page[off:off + n] if page is not None else bytes(n)
            gpa += n
            size -= n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        """kvm_write_guest(); ValueError outside RAM (KVM returns -EFAULT)."""
        size = len(data)
        if not in_ram(gpa, size):
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM")
        pos = 0
        while pos < size:
            pfn = gpa >> 12
            page = self._pages.get(pfn)
            if page is None:
                page = self._pages[pfn] = bytearray(PAGE)
            off = gpa & (PAGE - 1)
            n = min(size - pos, PAGE - off)
            page[off:off + n] = data[pos:pos + n]
            gpa += n
            pos += n

    def kvm_read_guest_cached(self, gpa: int, size: int) -> int:
        """A read through a gfn_to_hva cache: RAM, or the read-only slot. The model does not
        hold the KVM backend's ROM contents and reads it as zeros."""
        if in_ram(gpa, size):
            return self.read_int(gpa, size)
        return 0

    def kvm_write_guest_cached(self, gpa: int, size: int, value: int) -> None:
        """A write through a gfn_to_hva cache: dropped for the read-only slot."""
        if in_ram(gpa, size):
            self.write_int(gpa, size, value)

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
