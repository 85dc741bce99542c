"""The in-kernel i8259 pair (apicv.i8259.KvmPic): each test names the i8259.c function whose
behaviour it checks; the last part compares the model with the real KVM through host ioctls
(KVM_SET_IRQCHIP, KVM_IRQ_LINE_STATUS, KVM_GET_IRQCHIP) and is skipped without /dev/kvm.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apicv import uapi as U
from apicv.i8259 import KVM_PIC_STATE_FIELDS, SELECT_PIC, KvmPic, kvm_set_irq_status

MASTER_BASE, SLAVE_BASE = 0x08, 0x70
CREATED_MASTER = bytes(15) + b"\xf8"
CREATED_SLAVE = bytes(15) + b"\xde"
SRC = U.KVM_USERSPACE_IRQ_SOURCE_ID


def programmed(*, master_icw4: int = 0x01, slave_icw4: int = 0x01) -> KvmPic:
    """A PIC after the usual guest initialization (ICW1-ICW4 on both chips, as Linux's
    init_8259A does, master vectors 0x08, slave 0x70), with the ack list emptied."""
    p = KvmPic()
    for cmd, data, base, icw3, icw4 in ((0x20, 0x21, MASTER_BASE, 0x04, master_icw4),
                                        (0xA0, 0xA1, SLAVE_BASE, 0x02, slave_icw4)):
        p.pic_ioport_write(cmd, 0x11)  # ICW1: edge, cascade, ICW4 follows
        p.pic_ioport_write(data, base)  # ICW2
        p.pic_ioport_write(data, icw3)  # ICW3
        p.pic_ioport_write(data, icw4)  # ICW4
    p.acked.clear()
    p.mask_notified.clear()
    return p


def state(**fields: int) -> bytes:
    """A struct kvm_pic_state with the named fields set (the rest 0)."""
    return bytes(fields.get(name, 0) for name in KVM_PIC_STATE_FIELDS)


def field(data: bytes, name: str) -> int:
    return data[KVM_PIC_STATE_FIELDS.index(name)]


# ---------------------------------------------------------------------------- creation, ICWs
def test_kvm_pic_init_state():
    """kvm_pic_init: KVM_CREATE_IRQCHIP leaves both chips zeroed (kzalloc) but the ELCR masks
    0xF8 / 0xDE; no kvm_pic_reset runs (init_state 0), the output is low."""
    p = KvmPic()
    assert p.get_state(U.KVM_IRQCHIP_PIC_MASTER) == CREATED_MASTER
    assert p.get_state(U.KVM_IRQCHIP_PIC_SLAVE) == CREATED_SLAVE
    assert p.output == 0 and not p.wakeup_needed
    assert p.irq_states == [0] * 16 and p.pics[0].isr_ack == p.pics[1].isr_ack == 0
    assert p.acked == [] and p.trace is None


def test_pic_ioport_write_init_sequence_programs_irq_base():
    """pic_ioport_write ICW1-ICW4: ICW2 sets irq_base (low 3 bits dropped), ICW3 is skipped
    over, ICW4 is read only when ICW1 bit 0 asked for it; then the odd port is OCW1 again."""
    p = programmed()
    m, s = p.pics
    assert (m.irq_base, s.irq_base) == (MASTER_BASE, SLAVE_BASE)
    assert m.init_state == s.init_state == 0 and m.init4 == s.init4 == 1
    p.pic_ioport_write(0x20, 0x11)
    assert m.init_state == 1
    p.pic_ioport_write(0x21, 0x27)
    assert m.irq_base == 0x20 and m.init_state == 2
    p.pic_ioport_write(0x21, 0x04)
    assert m.init_state == 3
    p.pic_ioport_write(0x21, 0x01)
    assert m.init_state == 0 and m.imr == 0
    # ICW1 without IC4: ICW2, ICW3, then the next data write is OCW1 (IMR)
    p.pic_ioport_write(0xA0, 0x10)
    p.pic_ioport_write(0xA1, 0x58)
    p.pic_ioport_write(0xA1, 0x02)
    assert s.init_state == 0 and s.init4 == 0 and s.irq_base == 0x58
    p.pic_ioport_write(0xA1, 0xFB)
    assert s.imr == 0xFB


def test_kvm_pic_reset_icw1():
    """kvm_pic_reset (ICW1): drops edge IRR bits (level ones stay), clears IMR, last_irr,
    priority_add, special_mask, read_reg_select, and AEOI/SFNM unless ICW4 follows; keeps
    ISR, irq_base, poll and rotate_on_auto_eoi -- except that, when a vCPU accepts PIC
    interrupts, each dropped edge clears its ISR bit through pic_clear_isr (acked)."""
    before = state(last_irr=0x83, irr=0x83, imr=0xFF, isr=0x05, priority_add=3,
                   irq_base=0x20, read_reg_select=1, poll=1, special_mask=1, auto_eoi=1,
                   rotate_on_auto_eoi=1, special_fully_nested_mode=1, init4=1, elcr=0x80,
                   elcr_mask=0xF8)
    p = KvmPic()
    p.set_state(0, before)
    p.acked.clear()
    p.pic_ioport_write(0x20, 0x10)  # ICW1, no ICW4
    after = p.get_state(0)
    assert after == state(irr=0x80, isr=0x04, irq_base=0x20, poll=1, init_state=1,
                          rotate_on_auto_eoi=1, elcr=0x80, elcr_mask=0xF8)
    assert p.acked == [0, 1]  # bit 1 was not in service: still "acked"

    p = KvmPic()
    p.accept_pic_intr = False  # no vCPU takes ExtINT: no pic_clear_isr at all
    p.set_state(0, before)
    p.acked.clear()
    p.pic_ioport_write(0x20, 0x11)  # ICW1 with ICW4: AEOI and SFNM survive
    m = p.pics[0]
    assert m.isr == 0x05 and p.acked == []
    assert m.auto_eoi == 1 and m.special_fully_nested_mode == 1 and m.init4 == 1


def test_kvm_pic_reset_does_not_update_output():
    """kvm_pic_reset runs no pic_update_irq: after ICW1 drops the only request the output
    stays high, and the next kvm_pic_read_irq finds nothing -- spurious IRQ 7."""
    p = programmed()
    p.kvm_pic_set_irq(0, SRC, 1)
    assert p.output == 1
    p.pic_ioport_write(0x20, 0x11)
    assert p.pics[0].irr == 0 and p.output == 1
    assert p.kvm_pic_read_irq() == MASTER_BASE + 7
    assert p.output == 0


def test_kvm_pic_reset_public_both_chips():
    """kvm_pic_reset on both chips (chip=None) and on one."""
    p = programmed()
    p.kvm_pic_reset()
    assert p.pics[0].init_state == p.pics[1].init_state == 1
    p = programmed()
    p.kvm_pic_reset(1)
    assert (p.pics[0].init_state, p.pics[1].init_state) == (0, 1)


# ---------------------------------------------------------------------------- lines, IMR, ELCR
def test_pic_set_irq1_imr_masking():
    """pic_set_irq1 returns -1 for a pin masked in IMR but still latches the edge; the OCW1
    that unmasks it fires the mask notifier and runs pic_update_irq, raising the output."""
    p = programmed()
    p.pic_ioport_write(0x21, 0x01)
    assert p.mask_notified == [(0, True)]
    assert p.kvm_pic_set_irq(0, SRC, 1) == -1
    assert p.output == 0 and p.pics[0].irr == 0x01
    p.pic_ioport_write(0x21, 0x00)
    assert p.mask_notified == [(0, True), (0, False)]
    assert p.output == 1
    assert p.kvm_pic_read_irq() == MASTER_BASE
    p.pic_ioport_write(0xA1, 0x81)
    assert p.mask_notified[2:] == [(8, True), (15, True)]


def test_pic_set_irq1_edge_return_values():
    """pic_set_irq1, edge-triggered: a 0->1 edge returns 1, or 0 (coalesced) if IRR is still
    set; raising a line that is already high returns 1 (no edge, ret keeps its initial 1);
    lowering returns 1."""
    p = programmed()
    assert p.kvm_pic_set_irq(3, SRC, 1) == 1
    assert p.kvm_pic_set_irq(3, SRC, 1) == 1
    assert p.pics[0].irr == 0x08
    assert p.kvm_pic_set_irq(3, SRC, 0) == 1
    assert p.pics[0].irr == 0x08  # the edge stays latched
    assert p.kvm_pic_set_irq(3, SRC, 1) == 0  # coalesced
    assert p.kvm_pic_read_irq() == MASTER_BASE + 3
    assert p.pics[0].irr == 0  # pic_intack clears an edge IRR bit
    assert p.kvm_pic_set_irq(3, SRC, 0) == 1
    assert p.kvm_pic_set_irq(3, SRC, 1) == 1


def test_pic_set_irq1_level_return_values():
    """pic_set_irq1, level-triggered (ELCR bit set): IRR follows the line; a raise while IRR
    is set is coalesced (0); pic_intack leaves a level IRR bit set."""
    p = programmed()
    p.elcr_ioport_write(0x4D0, 0x08)
    assert p.kvm_pic_set_irq(3, SRC, 1) == 1
    assert p.kvm_pic_set_irq(3, SRC, 1) == 0
    assert p.kvm_pic_read_irq() == MASTER_BASE + 3
    assert p.pics[0].irr == 0x08 and p.pics[0].isr == 0x08
    assert p.kvm_pic_set_irq(3, SRC, 0) == 1
    assert p.pics[0].irr == 0 and p.pics[0].last_irr == 0


def test_elcr_ioport_write_masks_with_elcr_mask():
    """elcr_ioport_write: ELCR = value & elcr_mask, so IRQ 0, 1, 2, 8 and 13 can never be
    made level-triggered by the guest; elcr_ioport_read reads it back."""
    p = KvmPic()
    p.elcr_ioport_write(0x4D0, 0xFF)
    p.elcr_ioport_write(0x4D1, 0xFF)
    assert p.elcr_ioport_read(0x4D0) == 0xF8
    assert p.elcr_ioport_read(0x4D1) == 0xDE
    assert p.picdev_read(0x4D1) == 0xDE


def test_kvm_irq_line_state_is_or_of_sources():
    """__kvm_irq_line_state: a pin is high while any source holds it; kvm_pic_clear_all
    forgets one source without touching IRR (the line change only comes with the next call)."""
    p = programmed()
    assert p.kvm_pic_set_irq(5, 0, 1) == 1
    assert p.kvm_pic_set_irq(5, 2, 1) == 1  # already high: no edge
    assert p.irq_states[5] == 0b101
    p.kvm_pic_set_irq(5, 0, 0)
    assert p.pics[0].last_irr & 0x20  # still high through source 2
    p.kvm_pic_clear_all(2)
    assert p.irq_states[5] == 0 and p.pics[0].last_irr & 0x20
    p.kvm_pic_set_irq(5, 0, 0)
    assert not p.pics[0].last_irr & 0x20


# ---------------------------------------------------------------------------- priority, EOI
def test_pic_get_irq_priority_and_nesting():
    """pic_get_irq: the lowest pin wins; a request no higher than the one in service waits
    (output low) until a non-specific EOI (OCW2 0x20) clears the highest ISR bit."""
    p = programmed()
    p.kvm_pic_set_irq(5, SRC, 1)
    p.kvm_pic_set_irq(3, SRC, 1)
    assert p.kvm_pic_read_irq() == MASTER_BASE + 3
    assert p.pics[0].isr == 0x08 and p.output == 0
    p.kvm_pic_set_irq(1, SRC, 1)
    assert p.output == 1
    assert p.kvm_pic_read_irq() == MASTER_BASE + 1
    assert p.pics[0].isr == 0x0A
    p.pic_ioport_write(0x20, 0x20)
    assert p.pics[0].isr == 0x08 and p.acked == [1] and p.output == 0
    p.pic_ioport_write(0x20, 0x20)
    assert p.pics[0].isr == 0 and p.acked == [1, 3] and p.output == 1
    assert p.kvm_pic_read_irq() == MASTER_BASE + 5


def test_pic_ioport_write_specific_eoi():
    """pic_ioport_write OCW2 specific EOI (0x60 | pin): clears that ISR bit, whichever has
    priority; the ack is notified even for a pin that was not in service."""
    p = programmed()
    for pin in (3, 1):
        p.kvm_pic_set_irq(pin, SRC, 1)
        p.kvm_pic_read_irq()
    assert p.pics[0].isr == 0x0A
    p.pic_ioport_write(0x20, 0x63)
    assert p.pics[0].isr == 0x02 and p.acked == [3]
    p.pic_ioport_write(0x20, 0x66)
    assert p.pics[0].isr == 0x02 and p.acked == [3, 6]
    p.pic_ioport_write(0x20, 0x40)  # OCW2 command 2: no operation
    assert p.pics[0].isr == 0x02 and p.acked == [3, 6]


def test_pic_ioport_write_rotation():
    """pic_ioport_write OCW2: set priority (0xC0 | L) makes L+1 the highest pin; rotate on
    non-specific EOI (0xA0) and rotate on specific EOI (0xE0 | L) end a pin and make it the
    lowest (priority_add = pin + 1)."""
    p = programmed()
    p.pic_ioport_write(0x20, 0xC4)
    assert p.pics[0].priority_add == 5
    p.kvm_pic_set_irq(4, SRC, 1)
    p.kvm_pic_set_irq(5, SRC, 1)
    assert p.kvm_pic_read_irq() == MASTER_BASE + 5
    p.pic_ioport_write(0x20, 0xA0)
    assert p.pics[0].isr == 0 and p.pics[0].priority_add == 6 and p.acked == [5]
    p.kvm_pic_set_irq(7, SRC, 1)
    assert p.kvm_pic_read_irq() == MASTER_BASE + 7  # 6, 7, 0, ... 4: 7 beats 4
    p.pic_ioport_write(0x20, 0xE2)  # rotate on specific EOI of pin 2
    assert p.pics[0].priority_add == 3 and p.acked == [5, 2] and p.pics[0].isr == 0x80
    assert KvmPic.get_priority(p.pics[0], 0x08) == 0


def test_pic_intack_auto_eoi():
    """pic_intack in auto-EOI mode (ICW4 bit 1): the ISR bit is cleared (and acked) as the
    vector is read; OCW2 0x80 / 0x00 set / clear rotate-in-AEOI, which moves priority_add."""
    p = programmed(master_icw4=0x03)
    assert p.pics[0].auto_eoi == 1
    p.kvm_pic_set_irq(4, SRC, 1)
    assert p.kvm_pic_read_irq() == MASTER_BASE + 4
    assert p.pics[0].isr == 0 and p.acked == [4]
    p.pic_ioport_write(0x20, 0x80)
    assert p.pics[0].rotate_on_auto_eoi == 1
    p.kvm_pic_set_irq(6, SRC, 1)
    assert p.kvm_pic_read_irq() == MASTER_BASE + 6
    assert p.pics[0].priority_add == 7 and p.acked == [4, 6]
    p.pic_ioport_write(0x20, 0x00)
    assert p.pics[0].rotate_on_auto_eoi == 0


def test_pic_get_irq_special_fully_nested_mode():
    """pic_get_irq: in special fully nested mode (ICW4 bit 4) the master ignores its ISR bit
    2, so a higher-priority slave request gets through while another slave IRQ is in
    service; without it the cascade pin in service blocks it."""
    for sfnm, expect in ((0x11, 1), (0x01, 0)):
        p = programmed(master_icw4=sfnm)
        p.kvm_pic_set_irq(12, SRC, 1)
        assert p.kvm_pic_read_irq() == SLAVE_BASE + 4
        assert p.pics[0].isr == 0x04 and p.pics[1].isr == 0x10
        p.kvm_pic_set_irq(9, SRC, 1)
        assert p.output == expect


def test_special_mask_is_stored_but_ignored():
    """pic_ioport_write OCW3 0x68 sets special_mask, but pic_get_irq never reads it: a
    lower-priority request still waits for the one in service."""
    p = programmed()
    p.kvm_pic_set_irq(3, SRC, 1)
    p.kvm_pic_read_irq()
    p.pic_ioport_write(0x20, 0x68)
    assert p.pics[0].special_mask == 1
    p.kvm_pic_set_irq(5, SRC, 1)
    assert p.output == 0
    p.pic_ioport_write(0x20, 0x48)
    assert p.pics[0].special_mask == 0


# ---------------------------------------------------------------------------- reads
def test_pic_poll_read():
    """pic_poll_read: after OCW3 with P (0x0C) the next read of either port returns 0x80 |
    the pending pin and ends it (IRR and ISR bits cleared, acked, even for a level pin), or
    0x07 when nothing is pending; poll mode ends with the read."""
    p = programmed()
    p.elcr_ioport_write(0x4D0, 0x20)
    p.kvm_pic_set_irq(5, SRC, 1)
    p.pic_ioport_write(0x20, 0x0C)
    assert p.pics[0].poll == 1
    assert p.pic_ioport_read(0x21) == 0x85  # the odd port polls too
    m = p.pics[0]
    assert (m.irr, m.isr, m.poll, p.acked, p.output) == (0, 0, 0, [5], 0)
    assert p.pic_ioport_read(0x21) == 0  # IMR again
    p.pic_ioport_write(0x20, 0x0C)
    assert p.pic_ioport_read(0x20) == 7
    assert p.pics[0].poll == 0 and p.acked == [5]


def test_pic_poll_read_slave_clears_master_cascade():
    """pic_poll_read on the slave also clears the master's IRR and ISR bit 2."""
    p = programmed()
    p.kvm_pic_set_irq(10, SRC, 1)
    assert p.pics[0].irr == 0x04 and p.output == 1
    p.pic_ioport_write(0xA0, 0x0C)
    assert p.pic_ioport_read(0xA0) == 0x82
    assert p.pics[0].irr == 0 and p.pics[0].isr == 0 and p.pics[1].irr == 0
    assert p.acked == [10] and p.output == 0


def test_pic_ioport_read_irr_isr_select():
    """pic_ioport_read: the even port reads IRR or ISR as OCW3 RR/RIS (0x0A / 0x0B) last
    chose (an OCW3 without RR keeps the choice), the odd port IMR."""
    p = programmed()
    p.kvm_pic_set_irq(3, SRC, 1)
    p.kvm_pic_set_irq(5, SRC, 1)
    p.kvm_pic_read_irq()
    p.pic_ioport_write(0x21, 0x40)
    assert p.pic_ioport_read(0x20) == 0x20  # IRR (the default)
    p.pic_ioport_write(0x20, 0x0B)
    assert p.pic_ioport_read(0x20) == 0x08  # ISR
    p.pic_ioport_write(0x20, 0x08)
    assert p.pic_ioport_read(0x20) == 0x08
    p.pic_ioport_write(0x20, 0x0A)
    assert p.pic_ioport_read(0x20) == 0x20
    assert p.pic_ioport_read(0x21) == 0x40


# ---------------------------------------------------------------------------- cascade, spurious
def test_pic_update_irq_slave_cascade_through_irq2():
    """pic_update_irq: a slave request pulses master pin 2 (IRR bit 2 set, last_irr bit 2
    clear again); kvm_pic_read_irq acknowledges on both chips and returns the slave vector;
    each chip then needs its own EOI, acked as pins 10 and 2."""
    p = programmed()
    assert p.kvm_pic_set_irq(10, SRC, 1) == 1
    assert p.pics[1].irr == 0x04
    assert p.pics[0].irr == 0x04 and p.pics[0].last_irr == 0 and p.output == 1
    assert p.kvm_pic_read_irq() == SLAVE_BASE + 2
    assert p.pics[0].isr == 0x04 and p.pics[1].isr == 0x04 and p.pics[0].irr == 0
    p.pic_ioport_write(0xA0, 0x20)
    p.pic_ioport_write(0x20, 0x20)
    assert p.acked == [10, 2] and p.pics[0].isr == p.pics[1].isr == 0


def test_kvm_pic_read_irq_spurious_irq7():
    """kvm_pic_read_irq: nothing pending on the master gives its IRQ 7 vector and touches no
    ISR; the master asking for pin 2 with nothing on the slave gives the slave's IRQ 7."""
    p = programmed()
    assert p.kvm_pic_read_irq() == MASTER_BASE + 7
    assert p.pics[0].isr == 0 and p.acked == []
    p.set_state(0, state(irr=0x04, irq_base=MASTER_BASE, elcr_mask=0xF8))
    p.set_state(1, state(irq_base=SLAVE_BASE, elcr_mask=0xDE))
    assert p.output == 1
    assert p.kvm_pic_read_irq() == SLAVE_BASE + 7
    assert p.pics[0].isr == 0x04 and p.pics[1].isr == 0


def test_pic_irq_request_wakeup_needed():
    """pic_irq_request sets wakeup_needed whenever the output was low -- also when it stays
    low; kvm_pic_read_irq drops the output first, so it always asks for one."""
    p = KvmPic()
    p.kvm_pic_set_irq(3, SRC, 0)
    assert p.output == 0 and p.wakeup_needed
    p.wakeup_needed = False
    p.kvm_pic_set_irq(3, SRC, 1)
    assert p.output == 1 and p.wakeup_needed
    p.wakeup_needed = False
    p.kvm_pic_set_irq(4, SRC, 1)
    assert p.output == 1 and not p.wakeup_needed
    assert p.kvm_pic_read_irq() == 3  # irq_base 0 before any ICW2
    assert p.wakeup_needed and p.output == 0  # 4 waits behind 3 in service


# ---------------------------------------------------------------------------- access rules
def test_picdev_non_byte_access():
    """picdev_write / picdev_read: an access that is not one byte is dropped / reads 0 with
    no side effect (a pending poll stays pending); one that does not fit in a 2-port window
    never reaches the PIC (kvm_io_bus_cmp: a KVM_EXIT_IO), a ValueError here."""
    p = programmed()
    before = p.get_state(0), p.get_state(1)
    p.pic_ioport_write(0x20, 0x1111, size=2)
    p.picdev_write(0x4D0, 0xFFFF, size=2)
    p.picdev_write(0xA0, 0x11, size=2)
    assert (p.get_state(0), p.get_state(1)) == before
    p.pic_ioport_write(0x20, 0x0C)
    assert p.pic_ioport_read(0x20, size=2) == 0 and p.pics[0].poll == 1
    assert p.elcr_ioport_read(0x4D0, size=2) == 0
    for port, size in ((0x21, 2), (0x20, 4), (0xA1, 2), (0x4D1, 2), (0x20, 3)):
        with pytest.raises(ValueError):
            p.picdev_write(port, 0, size)
        with pytest.raises(ValueError):
            p.picdev_read(port, size)


def test_errors():
    """Ports outside the PIC/ELCR set, values wider than the access, pins and sources out of
    range, other chips and wrong state lengths are ValueErrors."""
    p = KvmPic()
    bad = (
        lambda: p.pic_ioport_write(0x22, 0), lambda: p.pic_ioport_read(0x4D0),
        lambda: p.elcr_ioport_write(0x20, 0), lambda: p.elcr_ioport_read(0x21),
        lambda: p.picdev_write(0x60, 0), lambda: p.picdev_read(0x61),
        lambda: p.pic_ioport_write(0x20, 0x100), lambda: p.elcr_ioport_write(0x4D0, -1),
        lambda: p.kvm_pic_set_irq(16, 0, 1), lambda: p.kvm_pic_set_irq(-1, 0, 1),
        lambda: p.kvm_pic_set_irq(0, 64, 1), lambda: p.kvm_pic_clear_all(-1),
        lambda: p.get_state(2), lambda: p.set_state(2, bytes(16)),
        lambda: p.set_state(0, bytes(15)), lambda: p.set_state(1, bytes(17)),
        lambda: p.kvm_pic_reset(2),
    )
    for call in bad:
        with pytest.raises(ValueError):
            call()
    assert p.get_state(0) == CREATED_MASTER


def test_get_set_state_round_trip():
    """kvm_vm_ioctl_get/set_irqchip: a state comes back as written -- any byte values,
    elcr_mask included -- unless the slave has a request: then set's kvm_pic_update_irq
    pulses master pin 2 (IRR bit 2 set if edge, cleared if level; last_irr bit 2 clear)."""
    p = KvmPic()
    weird = bytes(range(0xF0, 0x100))
    p.set_state(1, state(elcr_mask=0xFF))
    p.set_state(0, weird)
    assert p.get_state(0) == weird and p.get_state(1) == state(elcr_mask=0xFF)
    p.set_state(1, state(irr=0x01))  # slave requests pin 0
    edge = state(last_irr=0x04, elcr_mask=0xF8)
    p.set_state(0, edge)
    assert p.get_state(0) == state(elcr_mask=0xF8)  # last_irr high: no new edge, then cleared
    p.set_state(0, state(elcr_mask=0xF8))
    assert p.get_state(0) == state(irr=0x04, elcr_mask=0xF8)
    p.set_state(0, state(irr=0x04, last_irr=0x04, elcr=0x04, elcr_mask=0xFF))
    assert p.get_state(0) == state(elcr=0x04, elcr_mask=0xFF)  # the level pulse ends low


def test_kvm_set_irq_status_and_select_pic():
    """kvm_set_irq sums the non-negative results of a GSI's routes, -1 if none is; SELECT_PIC
    names the chip of a pin."""
    assert kvm_set_irq_status([]) == -1
    assert kvm_set_irq_status([-1, -1]) == -1
    assert kvm_set_irq_status([1, -1]) == 1
    assert kvm_set_irq_status([0, -1]) == 0
    assert kvm_set_irq_status([1, 1]) == 2
    assert [SELECT_PIC(pin) for pin in (0, 7, 8, 15)] == [0, 0, 1, 1]


class RecordingTracer:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def kvm_pic_set_irq(self, chip, pin, elcr, imr, coalesced) -> None:
        self.calls.append((chip, pin, elcr, imr, coalesced))


def test_trace_kvm_pic_set_irq():
    """kvm_pic_set_irq emits trace_kvm_pic_set_irq(chip, pin, elcr, imr, ret == 0) after the
    update; with trace None nothing is called."""
    p = programmed()
    p.kvm_pic_set_irq(10, SRC, 1)
    t = RecordingTracer()
    p.trace = t
    p.elcr_ioport_write(0x4D1, 0x08)
    p.pic_ioport_write(0xA1, 0x02)
    p.kvm_pic_set_irq(11, SRC, 1)
    p.kvm_pic_set_irq(10, SRC, 0)
    p.kvm_pic_set_irq(10, SRC, 1)
    p.kvm_pic_set_irq(9, SRC, 1)
    assert t.calls == [(1, 3, 0x08, 0x02, False), (1, 2, 0x08, 0x02, False),
                       (1, 2, 0x08, 0x02, True), (1, 1, 0x08, 0x02, False)]


# ---------------------------------------------------------------------------- properties
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
states = st.binary(min_size=16, max_size=16)
steps = st.lists(st.tuples(st.integers(0, 15), st.integers(0, 1)), max_size=24)


def loaded(master: bytes, slave: bytes) -> KvmPic:
    """Both chips loaded with KVM_SET_IRQCHIP, then one more kvm_pic_update_irq() so that the
    output is settled: with master last_irr bit 2 set and a slave request, the first update
    only clears last_irr and the next one raises master IRR bit 2 (any later line change
    would do that update, masked pin or not)."""
    p = KvmPic()
    p.set_state(1, slave)
    p.set_state(0, master)
    p.kvm_pic_update_irq()
    return p


@SETTINGS
@given(master=states, slave=states, seq=steps)
def test_masked_line_never_raises_output(master, slave, seq):
    """pic_set_irq1 / pic_get_irq: driving a pin whose IMR bit is set returns -1 and never
    changes the output, from any state KVM_SET_IRQCHIP accepts."""
    p = loaded(master, slave)
    out = p.output
    for pin, level in seq:
        if not p.pics[pin >> 3].imr >> (pin & 7) & 1:
            continue
        assert p.kvm_pic_set_irq(pin, SRC, level) == -1
        assert p.output == out


@SETTINGS
@given(master=states, slave=states, seq=steps)
def test_all_masked_output_stays_low(master, slave, seq):
    """pic_get_irq looks only at IRR & ~IMR: with IMR 0xFF on the master nothing reaches the
    output, and an ExtINT read is the master's spurious IRQ 7."""
    master = master[:2] + b"\xff" + master[3:]
    p = loaded(master, slave)
    for pin, level in seq:
        p.kvm_pic_set_irq(pin, SRC, level)
        assert p.output == 0
    assert p.kvm_pic_read_irq() == p.pics[0].irq_base + 7


@SETTINGS
@given(master=states, slave=states, seq=steps)
def test_kvm_pic_set_irq_result(master, slave, seq):
    """kvm_pic_set_irq returns -1 exactly for a masked pin, else 0 or 1; output always
    follows pic_get_irq on the master afterwards (pic_update_irq)."""
    p = loaded(master, slave)
    for pin, level in seq:
        masked = p.pics[pin >> 3].imr >> (pin & 7) & 1
        r = p.kvm_pic_set_irq(pin, SRC, level)
        assert (r == -1) == bool(masked) and r in (-1, 0, 1)
        assert p.output == (p.pic_get_irq(p.pics[0]) >= 0)


@SETTINGS
@given(master=states, slave=states)
def test_get_state_after_set_state(master, slave):
    """kvm_vm_ioctl_set_irqchip then get_irqchip: the slave comes back byte for byte; the
    master too unless the slave has an unmasked request, and then only IRR / last_irr bit 2
    may differ (the cascade pulse of kvm_pic_update_irq). Setting what was read back may
    change the master once more (an edge pin 2 whose last_irr the first pulse cleared gets
    its IRR bit from the second); from then on set(get()) changes nothing."""
    p = loaded(master, slave)
    assert p.get_state(1) == slave
    got = p.get_state(0)
    if not slave[1] & ~slave[2] & 0xFF:
        assert got == master
    else:
        assert got[2:] == master[2:]
        assert all((a ^ b) & ~0x04 == 0 for a, b in zip(got[:2], master[:2], strict=True))
    p.set_state(0, got)
    for chip in (0, 1):
        again = p.get_state(chip)
        p.set_state(chip, again)
        assert p.get_state(chip) == again


ports = st.sampled_from((0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1))
ops = st.lists(st.one_of(
    st.tuples(st.just("line"), st.integers(0, 15), st.integers(0, 1)),
    st.tuples(st.just("out"), ports, st.integers(0, 255)),
    st.tuples(st.just("in"), ports, st.just(0)),
    st.tuples(st.just("intack"), st.just(0), st.just(0)),
), max_size=30)


@SETTINGS
@given(master=states, slave=states, seq=ops)
def test_any_guest_sequence_keeps_state_well_formed(master, slave, seq):
    """Any mix of lines, port writes and reads and ExtINT acks from any state: every field
    stays a byte, reads return a byte, kvm_pic_read_irq returns irq_base + 0..7 of a chip,
    acks name pins 0-15."""
    p = loaded(master, slave)
    for kind, a, b in seq:
        if kind == "line":
            p.kvm_pic_set_irq(a, SRC, b)
        elif kind == "out":
            p.picdev_write(a, b)
        elif kind == "in":
            assert 0 <= p.picdev_read(a) <= 0xFF
        else:
            bases = {p.pics[0].irq_base, p.pics[1].irq_base}
            v = p.kvm_pic_read_irq()
            assert any(0 <= v - base <= 7 for base in bases)
        for s in p.pics:
            assert all(0 <= getattr(s, name) <= 0xFF for name in KVM_PIC_STATE_FIELDS)
    assert all(0 <= pin <= 15 for pin in p.acked)


# ---------------------------------------------------------------------------- the real KVM
try:
    from apicv.kvm import kvm_available

    _KVM_OK, _KVM_WHY = kvm_available()
except ImportError as e:  # pragma: no cover - the backend is part of the package
    _KVM_OK, _KVM_WHY = False, str(e)


def needs_kvm(test):
    """Mark a test as needing /dev/kvm; skipped, with the reason, where it cannot be used."""
    skip = pytest.mark.skipif(not _KVM_OK, reason=f"the KVM backend cannot run here: {_KVM_WHY}")
    return pytest.mark.kvm(skip(test))

IOAPIC_IRR_OFFSET = 16  # struct kvm_ioapic_state: base_address u64, ioregsel u32, id u32, irr


@pytest.fixture(scope="module")
def kvm_vm():
    import apicv

    with apicv.Vm(1, backend="kvm") as vm:
        vm.created_ioapic = vm.get_irqchip(U.KVM_IRQCHIP_IOAPIC)
        yield vm


def ioapic_set_irq_masked(irr: int, pin: int, level: int) -> tuple[int, int]:
    """ioapic.c ioapic_set_irq for a redirection entry as kvm_ioapic_reset leaves it (masked,
    edge-triggered): (result, new IRR). Not simply -1: lowering returns 1, a raise that finds
    the IRR bit already set is coalesced (0), only a new edge reaches ioapic_service, which
    returns -1 for the masked entry."""
    bit = 1 << pin
    if not level:
        return 1, irr & ~bit
    if irr & bit:
        return 0, irr
    return -1, irr | bit


def crosscheck(vm, master: bytes, slave: bytes, seq) -> list[int]:
    """Load the same PIC state into KVM and the model, drive the same GSIs as the userspace
    source and require equal statuses and equal kvm_pic_state bytes after every step. KVM's
    default routing sends GSI 0-15 to the PIC pin and the IOAPIC pin of that number;
    kvm_set_irq sums their results (kvm_set_irq_status), so the model's PIC result is
    combined with ioapic_set_irq_masked's. Returns KVM's statuses."""
    vm.set_irqchip(U.KVM_IRQCHIP_IOAPIC, vm.created_ioapic)  # IOAPIC IRR back to 0
    p = KvmPic()
    for chip, data in ((1, slave), (0, master)):  # slave first: the master's update sees it
        vm.set_irqchip(chip, data)
        p.set_state(chip, data)
    assert (vm.get_irqchip(0), vm.get_irqchip(1)) == (p.get_state(0), p.get_state(1))
    ioapic_irr = 0
    statuses = []
    for i, (gsi, level) in enumerate(seq):
        ioapic_ret, ioapic_irr = ioapic_set_irq_masked(ioapic_irr, gsi, level)
        expect = kvm_set_irq_status([p.kvm_pic_set_irq(gsi, SRC, level), ioapic_ret])
        got = vm.irq_line(gsi, level)
        assert got == expect, f"step {i}: KVM_IRQ_LINE_STATUS({gsi}, {level})"
        for chip in (0, 1):
            assert vm.get_irqchip(chip) == p.get_state(chip), f"step {i}: chip {chip}"
        statuses.append(got)
    kvm_irr = struct.unpack_from("<I", vm.get_irqchip(U.KVM_IRQCHIP_IOAPIC), IOAPIC_IRR_OFFSET)[0]
    assert kvm_irr == ioapic_irr
    return statuses



@needs_kvm
def test_kvm_create_irqchip_state():
    """kvm_pic_init on the real KVM: a new VM's two PIC states are the model's initial ones."""
    import apicv

    with apicv.Vm(1, backend="kvm") as vm:
        p = KvmPic()
        assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_MASTER) == p.get_state(0) == CREATED_MASTER
        assert vm.get_irqchip(U.KVM_IRQCHIP_PIC_SLAVE) == p.get_state(1) == CREATED_SLAVE


@needs_kvm
def test_kvm_irq_line_status_edge_line(kvm_vm):
    """pic_set_irq1 + kvm_set_irq on the real KVM, edge IRQ 3 unmasked: first raise 1 (PIC 1,
    IOAPIC -1); raising the high line again 1 (PIC 1 -- no edge, not "coalesced" --, IOAPIC
    0); lowering 2 (PIC 1 + IOAPIC 1); a new edge while IRR is still set 0 (coalesced in
    both)."""
    seq = [(3, 1), (3, 1), (3, 0), (3, 1)]
    assert crosscheck(kvm_vm, CREATED_MASTER, CREATED_SLAVE, seq) == [1, 1, 2, 0]


@needs_kvm
def test_kvm_cascade_pulse_coalesces_gsi2(kvm_vm):
    """pic_update_irq on the real KVM: a slave request sets master IRR bit 2 and leaves its
    last_irr bit 2 clear, so GSI 2 raised afterwards is an edge into a set IRR bit:
    coalesced (PIC 0, IOAPIC -1: status 0). The same update's pulse then clears last_irr bit
    2 again: while the slave requests, the master forgets that GSI 2 is held high, and every
    further raise is a new, coalesced edge."""
    seq = [(10, 1), (2, 1), (2, 1)]
    assert crosscheck(kvm_vm, CREATED_MASTER, CREATED_SLAVE, seq) == [1, 0, 0]
    assert field(kvm_vm.get_irqchip(0), "irr") == 0x04
    assert field(kvm_vm.get_irqchip(0), "last_irr") == 0


@needs_kvm
def test_kvm_set_irqchip_updates_master(kvm_vm):
    """kvm_vm_ioctl_set_irqchip on the real KVM: the state is taken unchecked (elcr_mask 0 or
    0xFF, init_state 7) and kvm_pic_update_irq then changes the master: a slave request sets
    an edge master IRR bit 2 and clears a level one."""
    slave = state(irr=0x01, elcr_mask=0xDE)
    crosscheck(kvm_vm, state(init_state=7), slave, [])
    assert kvm_vm.get_irqchip(0) == state(irr=0x04, init_state=7)
    level2 = state(irr=0x04, last_irr=0x04, elcr=0x04, elcr_mask=0xFF)
    crosscheck(kvm_vm, level2, slave, [])
    assert kvm_vm.get_irqchip(0) == state(elcr=0x04, elcr_mask=0xFF)


@needs_kvm
def test_kvm_set_irqchip_of_what_get_irqchip_read(kvm_vm):
    """kvm_vm_ioctl_set_irqchip on the real KVM is not always a no-op for a state just read
    with KVM_GET_IRQCHIP: master last_irr bit 2 high and a slave request -> the first update
    clears last_irr bit 2 without an edge; setting that state again gives IRR bit 2 its edge."""
    slave = state(irr=0x01, elcr_mask=0xDE)
    crosscheck(kvm_vm, state(last_irr=0x04, elcr_mask=0xF8), slave, [])
    read = kvm_vm.get_irqchip(0)
    assert read == state(elcr_mask=0xF8)
    crosscheck(kvm_vm, read, slave, [])
    assert kvm_vm.get_irqchip(0) == state(irr=0x04, elcr_mask=0xF8)


@needs_kvm
def test_kvm_level_triggered_line(kvm_vm):
    """pic_set_irq1 level-triggered on the real KVM (ELCR bit 3 via KVM_SET_IRQCHIP): a raise
    while IRR is set is coalesced, lowering clears IRR; a level value above 1 is high."""
    master = state(elcr=0x08, elcr_mask=0xF8)
    seq = [(3, 5), (3, 1), (3, 0), (3, 0xFFFFFFFF)]
    assert crosscheck(kvm_vm, master, CREATED_SLAVE, seq) == [1, 0, 2, 1]


@needs_kvm
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(master=states, slave=states, seq=steps)
def test_kvm_matches_model_on_random_states(kvm_vm, master, slave, seq):
    """The model against the real KVM from any 16-byte states (KVM accepts them all) and any
    line sequence on GSIs 0-15: same KVM_IRQ_LINE_STATUS statuses (the PIC's result combined
    by kvm_set_irq with the reset IOAPIC's masked-pin result) and the same kvm_pic_state
    bytes of both chips after every step."""
    crosscheck(kvm_vm, master, slave, seq)


# ---------------------------------------------------------------------------- the real KVM's guest
def guest_crosscheck(vm, master: bytes, slave: bytes, seq) -> None:
    """As :func:`crosscheck`, with the guest in the loop: ``out``/``in`` are OUT/IN the vCPU
    executes on a PIC or ELCR port (picdev_write/picdev_read), ``intack`` is one IF=1 window
    taking at most one interrupt -- the ExtINT whose vector kvm_pic_read_irq returns, or
    nothing when the output is low. The BSP's LVT0 is ExtINT (kvm_apic_accept_pic_intr true),
    as the model's ``accept_pic_intr`` default says. ``intack`` is skipped when a vector could
    fall below 32 (the agent would take it for an exception)."""
    cpu = vm.vcpus[0]
    vm.set_irqchip(U.KVM_IRQCHIP_IOAPIC, vm.created_ioapic)
    p = KvmPic()
    for chip, data in ((1, slave), (0, master)):
        vm.set_irqchip(chip, data)
        p.set_state(chip, data)
    ioapic_irr = 0
    for i, (kind, a, b) in enumerate(seq):
        where = f"step {i}: {kind} {a:#x} {b:#x}"
        if kind == "line":
            ioapic_ret, ioapic_irr = ioapic_set_irq_masked(ioapic_irr, a, b)
            expect = kvm_set_irq_status([p.kvm_pic_set_irq(a, SRC, b), ioapic_ret])
            assert vm.irq_line(a, b) == expect, where
        elif kind == "out":
            cpu.outb(a, b)
            p.picdev_write(a, b)
        elif kind == "in":
            assert cpu.inb(a) == p.picdev_read(a), where
        elif all(s.irq_base >= 0x20 for s in p.pics):
            expect = [p.kvm_pic_read_irq()] if p.output else []
            assert cpu.take_interrupts(limit=1, eoi=False) == expect, where
        for chip in (0, 1):
            assert vm.get_irqchip(chip) == p.get_state(chip), f"{where}: chip {chip}"


INIT_8259 = [("out", 0x20, 0x11), ("out", 0x21, 0x20), ("out", 0x21, 0x04), ("out", 0x21, 0x01),
             ("out", 0xA0, 0x11), ("out", 0xA1, 0x28), ("out", 0xA1, 0x02), ("out", 0xA1, 0x01)]


@needs_kvm
def test_kvm_guest_icw1_leaves_output_high(kvm_vm):
    """kvm_pic_reset on the real KVM, from a guest OUT: ICW1 drops the pending edge but runs
    no pic_update_irq, so the output stays high and the next ExtINT is the spurious IRQ 7 of
    the new irq_base."""
    seq = INIT_8259 + [("line", 0, 1), ("out", 0x20, 0x11), ("out", 0x21, 0x40),
                       ("out", 0x21, 0x04), ("out", 0x21, 0x01), ("intack", 0, 0),
                       ("intack", 0, 0)]
    guest_crosscheck(kvm_vm, CREATED_MASTER, CREATED_SLAVE, seq)
    assert kvm_vm.vcpus[0].take_interrupts(limit=1, eoi=False) == []
    assert field(kvm_vm.get_irqchip(0), "isr") == 0


@needs_kvm
def test_kvm_guest_eoi_poll_and_special_mask(kvm_vm):
    """i8259.c from a real guest: priority and nesting, the slave cascade, non-specific and
    specific EOI, rotation, OCW3 read select and poll, special mask stored but not used."""
    seq = INIT_8259 + [
        ("line", 5, 1), ("line", 3, 1), ("intack", 0, 0), ("intack", 0, 0),
        ("line", 10, 1), ("intack", 0, 0), ("out", 0x20, 0x0B), ("in", 0x20, 0),
        ("out", 0x20, 0x68), ("intack", 0, 0), ("out", 0xA0, 0x20), ("out", 0x20, 0x62),
        ("out", 0x20, 0xA0), ("intack", 0, 0), ("out", 0x20, 0x0C), ("in", 0x21, 0),
        ("line", 12, 1), ("out", 0xA0, 0x0C), ("in", 0xA0, 0), ("out", 0x20, 0xC4),
        ("line", 6, 0), ("line", 6, 1), ("line", 4, 0), ("line", 4, 1), ("intack", 0, 0),
        ("out", 0x4D1, 0xFF), ("in", 0x4D1, 0), ("out", 0x20, 0x0A), ("in", 0x20, 0),
    ]
    guest_crosscheck(kvm_vm, CREATED_MASTER, CREATED_SLAVE, seq)


lines = st.tuples(st.just("line"), st.integers(0, 15), st.sampled_from((1, 1, 0)))
intacks = st.tuples(st.just("intack"), st.just(0), st.just(0))
guest_ops = st.lists(st.one_of(
    lines, lines, intacks, intacks,
    st.tuples(st.just("out"), ports, st.integers(0, 255)),
    st.tuples(st.just("in"), ports, st.just(0)),
), max_size=24)
often_zero = st.one_of(st.just(0), st.integers(0, 255))


def _guest_state(raw: bytes, imr: int, isr: int, base: int, init_state: int) -> bytes:
    out = bytearray(raw)
    for name, value in (("imr", imr), ("isr", isr), ("irq_base", base),
                        ("init_state", init_state)):
        out[KVM_PIC_STATE_FIELDS.index(name)] = value
    return bytes(out)


# random states where requests get through often enough for ExtINTs to be taken; irq_base
# >= 0x20 so that intack can run
guest_states = st.builds(_guest_state, states, often_zero, often_zero, st.integers(0x20, 0xF8),
                         often_zero)


@needs_kvm
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(master=guest_states, slave=guest_states, seq=guest_ops)
def test_kvm_guest_matches_model(kvm_vm, master, slave, seq):
    """The model against the real KVM with guest port I/O and ExtINT acknowledges in the mix,
    from random states: same IN values, IRQ line statuses, vectors and kvm_pic_state bytes."""
    guest_crosscheck(kvm_vm, master, slave, seq)


@needs_kvm
def test_kvm_guest_icw1_asks_the_vcpus():
    """kvm_pic_reset on the real KVM: the dropped edges clear their ISR bits only if some
    vCPU accepts PIC interrupts (kvm_apic_accept_pic_intr: LVT0 unmasked ExtINT, or the APIC
    hardware-disabled). With the BSP's LVT0 masked the ISR survives ICW1 -- the model's
    ``accept_pic_intr = False``."""
    import apicv

    master = state(irr=0x0B, isr=0x0E, irq_base=0x20, elcr_mask=0xF8)
    for lvt0, accept, isr in ((0x700, True, 0x04), (0x10700, False, 0x0E)):
        with apicv.Vm(1, backend="kvm") as vm:
            cpu = vm.vcpus[0]
            page = bytearray(cpu.get_lapic())
            struct.pack_into("<I", page, 0x350, lvt0)
            cpu.set_lapic(bytes(page))
            vm.set_irqchip(1, CREATED_SLAVE)
            vm.set_irqchip(0, master)
            cpu.outb(0x20, 0x11)
            p = KvmPic()
            p.accept_pic_intr = accept
            p.set_state(1, CREATED_SLAVE)
            p.set_state(0, master)
            p.pic_ioport_write(0x20, 0x11)
            assert vm.get_irqchip(0) == p.get_state(0)
            assert field(p.get_state(0), "isr") == isr
