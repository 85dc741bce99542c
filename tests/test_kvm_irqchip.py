"""The real KVM's in-kernel IOAPIC and i8259 PIC, the VAPIC word and PV EOI, through the KVM
backend (apicv.kvm): each test names the KVM fact it checks.

Skipped, with the reason, where /dev/kvm cannot be used. Facts marked "this host" are what
the KVM of these machines (Linux 6.18, PVM backend) does where upstream KVM differs or leaves
it open; see /work/shared/reference/host-kvm-notes.md.
"""

from __future__ import annotations

import struct

import pytest

from apicv import uapi as U
from apicv.errors import GuestFault, KvmError
from apicv.kvm import KvmVm, kvm_available
from apicv.memory import RAM_END, RAM_START, SCRATCH_GPA

_OK, _WHY = kvm_available()
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not _OK, reason=f"the KVM backend cannot run here: {_WHY}"),
]

SPIV, TPR, PPR, EOI = 0xF0, 0x80, 0xA0, 0xB0
ISR, TMR, IRR = 0x100, 0x180, 0x200
IOREGSEL, IOWIN = 0x00, 0x10
PV_EOI_FLAG = SCRATCH_GPA + 0x100
RTE_MASK, RTE_LEVEL, RTE_REMOTE_IRR = 1 << 16, 1 << 15, 1 << 14


def reg(page: bytes, offset: int) -> int:
    return struct.unpack_from("<I", page, offset)[0]


def vectors(page: bytes, base: int) -> list[int]:
    return [32 * i + b for i in range(8) for b in range(32) if reg(page, base + 16 * i) >> b & 1]


def lapic_with(page: bytes, *, spiv: int = 0x1FF, tpr: int = 0, isr=(), irr=(),
               tmr=()) -> bytes:
    """A KVM_SET_LAPIC page: *page* with SPIV, TPR, and exactly these ISR/IRR/TMR vectors."""
    p = bytearray(page)
    struct.pack_into("<I", p, SPIV, spiv)
    struct.pack_into("<I", p, TPR, tpr)
    for base, vecs in ((ISR, isr), (IRR, irr), (TMR, tmr)):
        for i in range(8):
            struct.pack_into("<I", p, base + 16 * i, 0)
        for v in vecs:
            off = base + 16 * (v // 32)
            struct.pack_into("<I", p, off, reg(p, off) | 1 << (v % 32))
    return bytes(p)


def ioapic_state(vm: KvmVm) -> tuple[int, int, int, int, list[int]]:
    """struct kvm_ioapic_state: (base_address, ioregsel, id, irr, redirtbl[24])."""
    st = vm.get_irqchip(U.KVM_IRQCHIP_IOAPIC)
    base, sel, id_, irr, _pad = struct.unpack_from("<QIIII", st)
    return base, sel, id_, irr, list(struct.unpack_from("<24Q", st, 24))


def rte(vm: KvmVm, pin: int) -> int:
    return ioapic_state(vm)[4][pin]


def set_rte(cpu, pin: int, lo: int, hi: int = 0) -> None:
    """The guest programs redirection entry *pin* through IOREGSEL/IOWIN."""
    cpu.ioapic_write(IOREGSEL, 0x10 + 2 * pin)
    cpu.ioapic_write(IOWIN, lo)
    cpu.ioapic_write(IOREGSEL, 0x11 + 2 * pin)
    cpu.ioapic_write(IOWIN, hi)


def mask_pic(cpu) -> None:
    """kvm_pic_reset leaves IMR = 0 and ICW2 = 0, so a PIC IRQ would reach the BSP (LVT0
    ExtINT) as vector 0-15: mask both PICs so that GSIs 0-15 only reach the IOAPIC."""
    cpu.outb(0x21, 0xFF)
    cpu.outb(0xA1, 0xFF)


@pytest.fixture
def vm():
    with KvmVm(1) as v:
        yield v


# ---------------------------------------------------------------- KVM_GET/SET_IRQCHIP
def test_reset_state_of_the_irqchips(vm):
    """KVM_CREATE_IRQCHIP: kvm_pic_reset leaves every PIC field 0 except elcr_mask (0xF8 on
    the master, 0xDE on the slave: kvm_pic_init); kvm_ioapic_reset: base 0xFEC00000, ID 0,
    IOREGSEL 0, irr 0, all 24 redirection entries masked (0x10000)."""
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER) == bytes(15) + b"\xf8"
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_SLAVE) == bytes(15) + b"\xde"
    st = vm.get_irqchip(U.KVM_IRQCHIP_IOAPIC)
    assert len(st) == U.KVM_IOAPIC_STATE_SIZE == 216
    assert ioapic_state(vm) == (U.KVM_IOAPIC_DEFAULT_BASE_ADDRESS, 0, 0, 0, [RTE_MASK] * 24)


def test_irqchip_unknown_chip_id_is_einval(vm):
    """kvm_vm_ioctl_get_irqchip / set_irqchip: a chip_id other than 0-2 is -EINVAL."""
    for chip in (3, 100):
        with pytest.raises(KvmError) as e:
            vm.get_irqchip(chip)
        assert e.value.errno == U.EINVAL
    with pytest.raises(KvmError) as e:
        vm.set_irqchip(3, bytes(U.KVM_IRQCHIP_STATE_SIZE))
    assert e.value.errno == U.EINVAL


def test_set_irqchip_sizes(vm):
    """The backend takes the used size of the kvm_irqchip union (16 / 216 bytes) or all 512."""
    pic = vm.get_irqchip(0)
    vm.set_irqchip(0, pic)
    vm.set_irqchip(0, pic + bytes(512 - 16))
    vm.set_irqchip(2, vm.get_irqchip(2) + bytes(512 - 216))
    for chip, n in ((0, 15), (0, 216), (2, 16), (2, 511), (3, 16)):
        with pytest.raises(ValueError):
            vm.set_irqchip(chip, bytes(n))


def test_set_irqchip_round_trip(vm):
    """kvm_set_ioapic copies the state (ID, IOREGSEL, redirection entries) and KVM_GET_IRQCHIP
    returns it; the guest then reads the new ID and entry through IOREGSEL/IOWIN.
    kvm_pic_set_state likewise: the guest reads the IMR it set at port 0x21."""
    cpu = vm.vcpus[0]
    base, _sel, _id, _irr, tbl = ioapic_state(vm)
    tbl[7] = 0x0300_0000_0001_A055  # dest 3, masked, level, vector 0x55
    st = struct.pack("<QIIII24Q", base, 0x1F, 0x0A, 0, 0, *tbl)
    vm.set_irqchip(U.KVM_IRQCHIP_IOAPIC, st)
    assert vm.get_irqchip(U.KVM_IRQCHIP_IOAPIC) == st
    assert cpu.ioapic_read(IOREGSEL) == 0x1F
    assert cpu.ioapic_read(IOWIN) == 0x0300_0000  # RTE 7, high dword
    cpu.ioapic_write(IOREGSEL, 0x1E)
    assert cpu.ioapic_read(IOWIN) == 0x1A055
    cpu.ioapic_write(IOREGSEL, 0)
    assert cpu.ioapic_read(IOWIN) == 0x0A << 24
    pic = bytearray(vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER))
    pic[2] = 0x5A  # imr
    vm.set_irqchip(U.KVM_IRQCHIP_PIC_MASTER, bytes(pic))
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER) == bytes(pic)
    assert cpu.inb(0x21) == 0x5A


# ---------------------------------------------------------------- IOAPIC MMIO from the guest
def test_ioapic_indirect_registers(vm):
    """ioapic_read_indirect: VERSION (index 1) reads 0x00170011 (version 0x11, 24 entries);
    ID and ARB read (id & 0xF) << 24; redirection entry 0 reads 0x10000 / 0; an index past the
    last entry reads all ones; writing ID stores bits 27:24; IOREGSEL keeps 8 bits
    (ioapic_mmio_write); other offsets of the window read 0."""
    cpu = vm.vcpus[0]
    for index, want in ((1, 0x00170011), (0, 0), (2, 0), (0x10, RTE_MASK), (0x11, 0),
                        (0x3F, 0), (0x40, 0xFFFFFFFF), (0xFF, 0xFFFFFFFF)):
        cpu.ioapic_write(IOREGSEL, index)
        assert cpu.ioapic_read(IOWIN) == want, hex(index)
    cpu.ioapic_write(IOREGSEL, 0x1FF, 2)
    assert cpu.ioapic_read(IOREGSEL) == 0xFF
    cpu.ioapic_write(IOREGSEL, 0)
    cpu.ioapic_write(IOWIN, 0xFF00_0000)
    assert cpu.ioapic_read(IOWIN) == 0x0F00_0000
    assert ioapic_state(vm)[2] == 0xF
    cpu.ioapic_write(IOREGSEL, 2)
    assert cpu.ioapic_read(IOWIN) == 0x0F00_0000  # ARB reads the ID too
    assert cpu.ioapic_read(0x20) == 0 and cpu.ioapic_read(0xF8, 8) == 0


def test_ioapic_rte_write_from_the_guest(vm):
    """ioapic_write_indirect: a redirection entry written through IOWIN (low dword at index
    0x10 + 2n, high at 0x11 + 2n) appears in KVM_GET_IRQCHIP; remote IRR and delivery status
    are read-only (writing bits 12 and 14 stores nothing there)."""
    cpu = vm.vcpus[0]
    set_rte(cpu, 9, 0x0000_5841 | 1 << 12, 0x0200_0000)  # logical, remote-IRR bit, vec 0x41
    assert rte(vm, 9) == 0x0200_0000_0000_0841
    cpu.ioapic_write(IOREGSEL, 0x10 + 18)
    assert cpu.ioapic_read(IOWIN) == 0x841
    assert ioapic_state(vm)[1] == 0x10 + 18  # IOREGSEL


def test_ioapic_argument_checks(vm):
    """The same checks as the model: offset within the 0x100-byte window, size 1/2/4/8."""
    cpu = vm.vcpus[0]
    for off, size in ((0xFD, 4), (0x100, 1), (-1, 4), (0, 3)):
        with pytest.raises(ValueError):
            cpu.ioapic_read(off, size)
    with pytest.raises(ValueError):
        cpu.ioapic_write(0, 0x100, 1)


# ---------------------------------------------------------------- KVM_IRQ_LINE_STATUS
def test_irq_line_status_reset_chips(vm):
    """kvm_set_irq sums the routes' results, skipping negative ones, and starts from -1:
    GSIs 0-15 route to the PIC and the IOAPIC, 16-23 to the IOAPIC only, 24+ nowhere (-1).
    At reset the PIC's IMR is 0, so pic_set_irq1 counts 1 for a raise (and again 1 while
    last_irr holds it), the masked IOAPIC pin -1 (ioapic_service), then 0 (coalesced: irr
    already set); a lower counts 1 per chip."""
    assert [vm.irq_line(g, 1) for g in range(24)] == [1] * 16 + [-1] * 8
    assert [vm.irq_line(g, 1) for g in range(16, 24)] == [0] * 8
    assert [vm.irq_line(g, 0) for g in range(24)] == [2] * 16 + [1] * 8
    for g in (24, 1023, 1024, 4096, 0xFFFFFFFF):
        assert vm.irq_line(g, 1) == -1 and vm.irq_line(g, 0) == -1


def test_irq_line_masked_pins(vm):
    """With the PIC's IMR 0xFF (pic_set_irq1 -> -1, skipped) and every IOAPIC entry masked,
    raising any GSI 0-23 returns -1 and lowering returns 1 (kvm_ioapic_set_irq, level 0)."""
    mask_pic(vm.vcpus[0])
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER)[2] == 0xFF
    assert [vm.irq_line(g, 1) for g in range(24)] == [-1] * 24
    assert [vm.irq_line(g, 0) for g in range(24)] == [1] * 24


def test_irq_line_edge_coalescing(vm):
    """An unmasked edge entry (fixed, vector 0x40, dest 0): a raise delivers to 1 APIC (1);
    a second raise without a lower is coalesced (0: old_irr == irr); after a lower the next
    raise delivers again. KVM_GET_IRQCHIP reports irr & ~irr_delivered (0 for a delivered
    edge)."""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    mask_pic(cpu)
    set_rte(cpu, 5, 0x40)
    assert rte(vm, 5) == 0x40
    assert vm.irq_line(5, 1) == 1
    assert ioapic_state(vm)[3] == 0
    assert vectors(cpu.get_lapic(), IRR) == [0x40]
    assert vm.irq_line(5, 1) == 0
    assert vm.irq_line(5, 0) == 1
    assert vm.irq_line(5, 1) == 1
    assert cpu.take_interrupts() == [0x40]
    assert vm.irq_line(5, 1) == 0  # still high: coalesced
    assert vm.irq_line(5, 0) == 1


def test_irq_line_level_reraise(vm):
    """A level entry: the first raise delivers (1) and sets remote IRR; raising again while
    remote IRR is set returns -1 (ioapic_service refuses); the IOAPIC's irr bit follows the
    line; a masked level entry returns -1 on every raise (no coalescing for level)."""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    set_rte(cpu, 17, RTE_LEVEL | 0x41)
    assert vm.irq_line(17, 1) == 1
    assert rte(vm, 17) == RTE_LEVEL | RTE_REMOTE_IRR | 0x41
    assert ioapic_state(vm)[3] == 1 << 17
    assert vm.irq_line(17, 1) == -1
    assert vm.irq_line(17, 0) == 1
    assert ioapic_state(vm)[3] == 0
    assert vm.irq_line(17, 1) == -1  # remote IRR still set: nothing delivered
    set_rte(cpu, 18, RTE_MASK | RTE_LEVEL | 0x42)
    assert [vm.irq_line(18, 1) for _ in range(2)] == [-1, -1]
    assert ioapic_state(vm)[3] == 1 << 17 | 1 << 18


def test_irq_line_no_destination(vm):
    """An entry whose destination matches no APIC (physical ID 5): kvm_irq_delivery_to_apic
    delivers to 0 APICs, so the raise returns 0 and a level entry does not set remote IRR."""
    cpu = vm.vcpus[0]
    set_rte(cpu, 19, 0x43, 5 << 24)
    assert vm.irq_line(19, 1) == 0
    set_rte(cpu, 20, RTE_LEVEL | 0x44, 5 << 24)
    assert vm.irq_line(20, 1) == 0
    assert not rte(vm, 20) & RTE_REMOTE_IRR


def test_gsi_0_and_2_reach_their_own_pins(vm):
    """The default routing maps GSI n to IOAPIC pin n (no 0 -> 2 override in KVM): GSI 0
    delivers pin 0's vector, GSI 2 pin 2's."""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    mask_pic(cpu)
    set_rte(cpu, 0, 0x50)
    set_rte(cpu, 2, 0x52)
    assert vm.irq_line(0, 1) == 1 and vm.irq_line(0, 0) == 1
    assert cpu.take_interrupts() == [0x50]
    assert vm.irq_line(2, 1) == 1 and vm.irq_line(2, 0) == 1
    assert cpu.take_interrupts() == [0x52]


def test_level_eoi_broadcast_clears_remote_irr(vm):
    """kvm_ioapic_update_eoi: a guest EOI that clears a level-triggered ISR vector (TMR set)
    clears remote IRR of the IOAPIC entries with that vector; with the line still high the
    pin is serviced again (remote IRR and the LAPIC's IRR set again)."""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    set_rte(cpu, 17, RTE_LEVEL | 0x61)
    assert vm.irq_line(17, 1) == 1
    assert rte(vm, 17) & RTE_REMOTE_IRR
    page = cpu.get_lapic()
    assert vectors(page, IRR) == [0x61] and vectors(page, TMR) == [0x61]
    # the vector is in service (the guest took it); the line goes low before the EOI
    cpu.set_lapic(lapic_with(page, isr=[0x61], tmr=[0x61]))
    assert vm.irq_line(17, 0) == 1
    cpu.mmio_write(EOI, 0)
    assert not rte(vm, 17) & RTE_REMOTE_IRR
    page = cpu.get_lapic()
    assert vectors(page, ISR) == [] and vectors(page, IRR) == []
    # again with the line high: the EOI re-services the pin
    assert vm.irq_line(17, 1) == 1
    cpu.set_lapic(lapic_with(cpu.get_lapic(), isr=[0x61], tmr=[0x61]))
    cpu.mmio_write(EOI, 0)
    assert rte(vm, 17) & RTE_REMOTE_IRR
    assert vectors(cpu.get_lapic(), IRR) == [0x61]


def test_injection_acts_as_eoi_on_this_host(vm):
    """This host: injecting a level-triggered IOAPIC vector performs its EOI broadcast at
    once, without a guest EOI (the vector never shows in ISR): with the line high the pin is
    re-serviced after every injection, so the vector is back in IRR; after the line goes low
    the next injection clears remote IRR. (Upstream KVM sets ISR in kvm_get_apic_interrupt
    and broadcasts only at the guest's EOI.)"""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    set_rte(cpu, 17, RTE_LEVEL | 0x41)
    assert vm.irq_line(17, 1) == 1
    assert cpu.take_interrupts(limit=1, eoi=False) == [0x41]
    page = cpu.get_lapic()
    assert vectors(page, ISR) == [] and vectors(page, IRR) == [0x41]
    assert rte(vm, 17) & RTE_REMOTE_IRR
    assert vm.irq_line(17, 0) == 1
    assert cpu.take_interrupts(limit=1, eoi=False) == [0x41]
    assert not rte(vm, 17) & RTE_REMOTE_IRR
    assert vectors(cpu.get_lapic(), IRR) == []
    assert cpu.take_interrupts(eoi=False) == []


# ---------------------------------------------------------------- the PIC from the guest
def test_pic_ports_from_the_guest(vm):
    """The in-kernel i8259 answers ports 0x20/0x21/0xA0/0xA1 and the ELCR at 0x4D0/0x4D1
    without a userspace exit: OCW1 at 0x21 is the IMR (kvm_pic_state.imr); the ELCR keeps only
    elcr_mask's bits (0xF8 master, 0xDE slave); ICW1-4 set irq_base; an unmasked IRQ reaches
    the BSP through LVT0 ExtINT as irq_base + irq and enters the PIC's ISR until the
    non-specific EOI (OCW2 0x20); OCW3 0x0B selects ISR for reads of port 0x20."""
    cpu = vm.vcpus[0]
    assert [cpu.inb(p) for p in (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1)] == [0] * 6
    cpu.outb(0x21, 0xA5)
    assert cpu.inb(0x21) == 0xA5
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER)[2] == 0xA5
    cpu.outb(0x4D0, 0xFF)
    cpu.outb(0x4D1, 0xFF)
    assert (cpu.inb(0x4D0), cpu.inb(0x4D1)) == (0xF8, 0xDE)
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER)[14] == 0xF8
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_SLAVE)[14] == 0xDE
    cpu.outb(0x4D0, 0)
    cpu.outb(0x4D1, 0)
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01),
                        (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01)):
        cpu.outb(port, value)
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER)[5] == 0x20  # irq_base
    assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_SLAVE)[5] == 0x28
    cpu.outb(0x21, 0xF7)  # only IRQ 3
    cpu.outb(0xA1, 0xFF)
    cpu.mmio_write(SPIV, 0x1FF)
    assert vm.irq_line(3, 1) == 1 and vm.irq_line(3, 0) == 2
    assert cpu.take_interrupts() == [0x23]
    cpu.outb(0x20, 0x0B)
    assert cpu.inb(0x20) == 0x08
    cpu.outb(0x20, 0x20)
    assert cpu.inb(0x20) == 0


def test_port_argument_checks(vm):
    """Only the PIC, ELCR and PIT ports (0x40-0x43, 0x61); one byte."""
    cpu = vm.vcpus[0]
    for port in (0x22, 0x44, 0x3F0, 0x4D2):
        with pytest.raises(ValueError):
            cpu.inb(port)
    with pytest.raises(ValueError):
        cpu.outb(0x21, 0x100)


# ---------------------------------------------------------------- guest RAM
def test_guest_memory_round_trip(vm):
    """The guest's stores land in the RAM memslot the VMM reads, and the VMM's writes are
    what the guest loads (sizes 1, 2, 4, 8)."""
    cpu = vm.vcpus[0]
    cpu.guest_store(SCRATCH_GPA, 0x1122334455667788, 8)
    assert vm.read_guest(SCRATCH_GPA, 8) == bytes.fromhex("8877665544332211")
    cpu.guest_store(SCRATCH_GPA + 1, 0xAB, 1)
    cpu.guest_store(SCRATCH_GPA + 2, 0xCDEF, 2)
    assert vm.read_guest(SCRATCH_GPA, 4) == bytes.fromhex("88abefcd")
    vm.write_guest(SCRATCH_GPA + 0x10, b"\x01\x02\x03\x04")
    assert cpu.guest_load(SCRATCH_GPA + 0x10) == 0x04030201
    assert cpu.guest_load(SCRATCH_GPA + 0x11, 2) == 0x0302
    assert cpu.guest_load(RAM_END - 8, 8) == 0


def test_guest_memory_argument_checks(vm):
    """apicv.memory.in_ram decides (the model's rule): page 0 and RAM_END onwards are not RAM."""
    cpu = vm.vcpus[0]
    for gpa, size in ((0, 4), (RAM_START - 1, 2), (RAM_END - 2, 4), (RAM_END, 1)):
        with pytest.raises(ValueError):
            vm.read_guest(gpa, size)
        with pytest.raises(ValueError):
            cpu.guest_load(gpa, size)
        with pytest.raises(ValueError):
            vm.write_guest(gpa, bytes(size))
    with pytest.raises(ValueError):
        cpu.guest_load(SCRATCH_GPA, 3)
    with pytest.raises(ValueError):
        cpu.guest_store(SCRATCH_GPA, 0x100, 1)
    assert vm.read_guest(RAM_START, 1) == b"\0" and vm.read_guest(RAM_END - 1, 1) == b"\0"


# ---------------------------------------------------------------- VAPIC
def test_set_vapic_addr_needs_a_memslot(vm):
    """kvm_lapic_set_vapic_addr: 0 turns the VAPIC off; a nonzero address must map 4 bytes in
    a memslot (kvm_gfn_to_hva_cache_init), else -EINVAL: page 0, RAM_END, a word crossing it,
    the APIC and IOAPIC pages and addresses past MAXPHYADDR."""
    cpu = vm.vcpus[0]
    for gpa in (SCRATCH_GPA, RAM_END - 4, 0):
        cpu.set_vapic_addr(gpa)
    for gpa in (0xFFF, RAM_END - 3, RAM_END, 0xFEE00000, 0xFEC00000, 1 << 40):
        with pytest.raises(KvmError) as e:
            cpu.set_vapic_addr(gpa)
        assert e.value.errno == U.EINVAL, hex(gpa)


def test_vapic_word_and_tpr_sync(vm):
    """kvm_lapic_sync_to_vapic (on an entry that handles KVM_REQ_EVENT, LAPIC enabled) writes
    TPR | (highest ISR & 0xF0) << 8 | highest IRR << 24; kvm_lapic_sync_from_vapic (after
    every exit) sets TPR from the word's low byte, which also moves PPR; a TPR written by
    MMIO is overwritten from the word at the next exit."""
    cpu = vm.vcpus[0]
    vm.write_guest(SCRATCH_GPA, b"\xaa\xbb\xcc\xdd")
    cpu.set_vapic_addr(SCRATCH_GPA)
    cpu.set_lapic(lapic_with(cpu.get_lapic(), tpr=0x20, isr=[0x35], irr=[0x52, 0x71]))
    assert vm.read_guest(SCRATCH_GPA, 4) == b"\xaa\xbb\xcc\xdd"  # nothing before an entry
    assert cpu.run() == []
    assert reg(vm.read_guest(SCRATCH_GPA, 4), 0) == 0x71003020
    page = cpu.get_lapic()
    assert (reg(page, TPR), reg(page, PPR)) == (0x20, 0x30)
    assert cpu.guest_load(SCRATCH_GPA) == 0x71003020
    cpu.guest_store(SCRATCH_GPA, 0x40, 1)
    page = cpu.get_lapic()
    assert (reg(page, TPR), reg(page, PPR)) == (0x40, 0x40)
    cpu.guest_store(SCRATCH_GPA, 0x10, 1)
    page = cpu.get_lapic()
    assert (reg(page, TPR), reg(page, PPR)) == (0x10, 0x30)
    cpu.mmio_write(TPR, 0x30)  # PPR stays 0x30: no KVM_REQ_EVENT, no sync_to_vapic
    assert reg(cpu.get_lapic(), TPR) == 0x10  # the word wins
    cpu.set_vapic_addr(0)
    cpu.mmio_write(TPR, 0x30)
    assert reg(cpu.get_lapic(), TPR) == 0x30


def test_vapic_word_read_without_sync_to(vm):
    """kvm_lapic_sync_from_vapic does not check that the LAPIC is enabled, but
    kvm_lapic_sync_to_vapic runs only for an enabled LAPIC: with SPIV 0xFF the word is never
    written, and TPR is loaded from whatever the VMM left there."""
    cpu = vm.vcpus[0]
    vm.write_guest(SCRATCH_GPA, b"\xaa\xbb\xcc\xdd")
    cpu.set_vapic_addr(SCRATCH_GPA)
    cpu.run()
    assert vm.read_guest(SCRATCH_GPA, 4) == b"\xaa\xbb\xcc\xdd"
    assert reg(cpu.get_lapic(), TPR) == 0xAA


# ---------------------------------------------------------------- PV EOI
def test_pv_eoi_msr(vm):
    """kvm_lapic_set_pv_eoi: MSR_KVM_PV_EOI_EN takes a 4-byte aligned GPA | 1 in a memslot;
    a misaligned address (bit 1 set) or one outside every memslot (page 0, RAM_END, the APIC
    page) is #GP for the guest (and refused by KVM_SET_MSRS); disabling keeps the address."""
    cpu = vm.vcpus[0]
    assert cpu.rdmsr(U.MSR_KVM_PV_EOI_EN) == 0
    cpu.wrmsr(U.MSR_KVM_PV_EOI_EN, PV_EOI_FLAG | 1)
    assert cpu.get_msr(U.MSR_KVM_PV_EOI_EN) == PV_EOI_FLAG | 1
    for bad in (PV_EOI_FLAG | 3, PV_EOI_FLAG | 2, 1, RAM_END | 1, 0xFEE00001):
        with pytest.raises(GuestFault) as e:
            cpu.wrmsr(U.MSR_KVM_PV_EOI_EN, bad)
        assert e.value.vector == 13
        assert cpu.rdmsr(U.MSR_KVM_PV_EOI_EN) == PV_EOI_FLAG | 1
    assert not cpu.set_msr(U.MSR_KVM_PV_EOI_EN, RAM_END | 1)
    cpu.wrmsr(U.MSR_KVM_PV_EOI_EN, RAM_END - 4 | 1)  # the 1-byte cache fits
    cpu.wrmsr(U.MSR_KVM_PV_EOI_EN, PV_EOI_FLAG)
    assert cpu.rdmsr(U.MSR_KVM_PV_EOI_EN) == PV_EOI_FLAG


def test_pv_eoi_not_armed_for_isr_from_set_lapic(vm):
    """apic_sync_pv_eoi_to_guest arms PV EOI only when highest_isr_cache != -1, which only
    apic_set_isr (an injection) sets; kvm_apic_set_state resets it to -1. So an ISR bit set
    through KVM_SET_LAPIC never arms the flag: KVM leaves the byte alone (a 1 the VMM put
    there stays 1; a 0 stays 0), the guest reads it unchanged inside KVM_RUN, and clearing
    it EOIs nothing."""
    cpu = vm.vcpus[0]
    cpu.wrmsr(U.MSR_KVM_PV_EOI_EN, PV_EOI_FLAG | 1)
    for preset in (0, 1):
        vm.write_guest(PV_EOI_FLAG, bytes([preset]))
        cpu.set_lapic(lapic_with(cpu.get_lapic(), isr=[0x35]))
        assert cpu.run() == []
        assert vm.read_guest(PV_EOI_FLAG, 1) == bytes([preset])
        assert cpu.guest_load(PV_EOI_FLAG, 1) == preset
        cpu.guest_store(PV_EOI_FLAG, 0, 1)
        assert vectors(cpu.get_lapic(), ISR) == [0x35]


def test_pv_eoi_handler_skips_the_eoi_when_the_flag_is_set(vm):
    """Linux's kvm_guest_apic_eoi_write, as the agent does it: a handler that finds the flag
    set clears it instead of writing EOI. KVM does not arm the flag while another vector is
    pending in IRR (apic->irr_pending), so a 1 the VMM put there is what the first handler
    sees: ISR 0x35 (from KVM_SET_LAPIC) survives that handler; the second handler finds 0 and
    its MMIO EOI clears 0x35 (this host: the injected vectors never enter ISR)."""
    cpu = vm.vcpus[0]
    cpu.wrmsr(U.MSR_KVM_PV_EOI_EN, PV_EOI_FLAG | 1)
    cpu.set_lapic(lapic_with(cpu.get_lapic(), isr=[0x35]))
    vm.write_guest(PV_EOI_FLAG, b"\x01")
    assert vm.signal_msi(0xFEE00000, 0, 0x55) == 1
    assert vm.signal_msi(0xFEE00000, 0, 0x56) == 1
    assert cpu.take_interrupts(limit=1) == [0x56]
    assert cpu.pv_eoi_skipped == 1
    assert vm.read_guest(PV_EOI_FLAG, 1) == b"\0"
    page = cpu.get_lapic()
    assert vectors(page, ISR) == [0x35] and vectors(page, IRR) == [0x55]
    assert cpu.take_interrupts() == [0x55]
    assert cpu.pv_eoi_skipped == 1
    assert vectors(cpu.get_lapic(), ISR) == []


def test_pv_eoi_off_handlers_always_eoi(vm):
    """With MSR_KVM_PV_EOI_EN bit 0 clear the handlers ignore the flag byte (left as it is)
    and write EOI."""
    cpu = vm.vcpus[0]
    cpu.wrmsr(U.MSR_KVM_PV_EOI_EN, PV_EOI_FLAG)
    cpu.set_lapic(lapic_with(cpu.get_lapic(), isr=[0x35]))
    vm.write_guest(PV_EOI_FLAG, b"\x01")
    assert vm.signal_msi(0xFEE00000, 0, 0x55) == 1
    assert cpu.take_interrupts() == [0x55]
    assert cpu.pv_eoi_skipped == 0
    assert vm.read_guest(PV_EOI_FLAG, 1) == b"\x01"
    assert vectors(cpu.get_lapic(), ISR) == []
