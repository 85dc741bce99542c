"""The in-kernel i8259 pair: KVM's ``struct kvm_pic`` and the functions of arch/x86/kvm/i8259.c
that work on it, under their KVM names.

One :class:`KvmPic` is the two cascaded 8259s KVM_CREATE_IRQCHIP makes (``kvm_pic_init``):
``pics[0]`` the master (ports 0x20/0x21, ELCR 0x4D0), ``pics[1]`` the slave (0xA0/0xA1, ELCR
0x4D1), its INTR output wired to the master's IRQ 2. Each chip is a :class:`KvmKpicState`, every
field of ``struct kvm_kpic_state`` (arch/x86/kvm/irq.h) as an 8-bit int.

The PIC never calls its peers. What KVM does outside the PIC lock is left for the VM:

* ``wakeup_needed`` -- set by ``pic_irq_request`` whenever the output was low; KVM's
  ``pic_unlock`` then kicks the first vCPU whose ``kvm_apic_accept_pic_intr`` is true. The VM
  reads and clears the flag after each call and does the kick.
* ``acked`` -- the pins ``pic_clear_isr`` passed to ``kvm_notify_acked_irq`` (0-7 master, 8-15
  slave). Under KVM's default routing a PIC pin is the GSI of the same number; a VM with its
  own routing maps ``(SELECT_PIC(pin), pin)`` with ``kvm_irq_map_chip_pin``. KVM drops the lock
  around the notifier, so running the notifiers after the call is one of the orders KVM allows.
* ``mask_notified`` -- ``(pin, masked)`` for each ``kvm_fire_mask_notifiers`` an IMR write makes.
* ``accept_pic_intr`` -- what ``kvm_pic_reset`` asks the vCPUs (is there one for which
  ``kvm_apic_accept_pic_intr`` is true?); the VM keeps it current.

Port I/O (``picdev_write``/``picdev_read``) is what KVM's three kvm_io_devices do for an IN or
OUT the guest executes; the PIC ioctls are :meth:`KvmPic.get_state` / :meth:`KvmPic.set_state`
(``kvm_vm_ioctl_get_irqchip`` / ``kvm_vm_ioctl_set_irqchip``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .uapi import KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIC_STATE_SIZE

if TYPE_CHECKING:
    from .trace import Tracer

PIC_NUM_PINS = 16
BITS_PER_LONG = 64  # irq_states[] are unsigned longs: one bit per irq_source_id
PIC_MASTER_ELCR_MASK = 0xF8  # kvm_pic_init: IRQ 0, 1, 2 are edge-only on the master
PIC_SLAVE_ELCR_MASK = 0xDE  # ... and IRQ 8 and 13 on the slave

# struct kvm_pic_state (arch/x86/include/uapi/asm/kvm.h): the first 16 bytes of kvm_kpic_state
KVM_PIC_STATE_FIELDS = (
    "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
    "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode",
    "init4", "elcr", "elcr_mask",
)
assert len(KVM_PIC_STATE_FIELDS) == KVM_PIC_STATE_SIZE

PIC_MASTER_PORTS = (0x20, 0x21)
PIC_SLAVE_PORTS = (0xA0, 0xA1)
PIC_ELCR_PORTS = (0x4D0, 0x4D1)
# kvm_pic_init registers three 2-port devices on KVM_PIO_BUS
_PICDEV_WINDOWS = (0x20, 0xA0, 0x4D0)


def SELECT_PIC(irq: int) -> int:
    """irq.h SELECT_PIC: the irqchip id of PIC pin *irq* (0-7 master, 8-15 slave)."""
    return KVM_IRQCHIP_PIC_MASTER if irq < 8 else KVM_IRQCHIP_PIC_SLAVE


def kvm_set_irq_status(results: list[int]) -> int:
    """How virt/kvm/irqchip.c kvm_set_irq sums the results of a GSI's routes into the
    KVM_IRQ_LINE_STATUS status: negative results are skipped, the others added; -1 if every
    route was negative (masked or undelivered)."""
    ret = -1
    for r in results:
        if r < 0:
            continue
        ret = r + (0 if ret < 0 else ret)
    return ret


class KvmKpicState:
    """struct kvm_kpic_state (arch/x86/kvm/irq.h): one 8259 of the pair. ``index`` stands for
    KVM's ``s == &s->pics_state->pics[0]`` test (0 master, 1 slave)."""

    __slots__ = KVM_PIC_STATE_FIELDS + ("isr_ack", "index")

    def __init__(self, index: int) -> None:
        # kvm_pic_init allocates with kzalloc: every field starts at 0
        for name in KVM_PIC_STATE_FIELDS:
            setattr(self, name, 0)
        self.isr_ack = 0  # in the struct, never used by i8259.c, not in kvm_pic_state
        self.index = index

    def to_bytes(self) -> bytes:
        """The struct kvm_pic_state bytes (the memcpy kvm_vm_ioctl_get_irqchip does)."""
        return bytes(getattr(self, name) for name in KVM_PIC_STATE_FIELDS)

    def load(self, data: bytes) -> None:
        """Overwrite the kvm_pic_state fields (the memcpy of kvm_vm_ioctl_set_irqchip: no
        check of any value, elcr_mask included; isr_ack is not part of it)."""
        for name, value in zip(KVM_PIC_STATE_FIELDS, data, strict=True):
            setattr(self, name, value)

    def __repr__(self) -> str:
        who = "master" if self.index == 0 else "slave"
        return (f"KvmKpicState({who}, irr={self.irr:#04x}, imr={self.imr:#04x}, "
                f"isr={self.isr:#04x}, elcr={self.elcr:#04x}, irq_base={self.irq_base:#04x})")


class KvmPic:
    """struct kvm_pic (arch/x86/kvm/irq.h) and arch/x86/kvm/i8259.c.

    The state is the one right after KVM_CREATE_IRQCHIP (``kvm_pic_init``): all zero but the
    ELCR masks 0xF8 / 0xDE. KVM does not run ``kvm_pic_reset`` at creation (``init_state`` is
    0, not 1)."""

    def __init__(self) -> None:
        self.pics = (KvmKpicState(0), KvmKpicState(1))
        self.pics[0].elcr_mask = PIC_MASTER_ELCR_MASK
        self.pics[1].elcr_mask = PIC_SLAVE_ELCR_MASK
        self.output = 0  # INTR from the master PIC
        self.wakeup_needed = False
        # __kvm_irq_line_state: per pin, one bit per irq_source_id that holds the line high
        self.irq_states = [0] * PIC_NUM_PINS
        self.accept_pic_intr = True  # a vCPU at reset accepts ExtINT (LVT0, LINT0 quirk)
        self.acked: list[int] = []
        self.mask_notified: list[tuple[int, bool]] = []
        self.trace: Tracer | None = None

    # ------------------------------------------------------------------ core (i8259.c)
    def pic_clear_isr(self, s: KvmKpicState, irq: int) -> None:
        """pic_clear_isr: clear the ISR bit and notify the ack (``kvm_notify_acked_irq`` with
        the pin, slave pins numbered 8-15), whether or not the bit was set."""
        s.isr &= ~(1 << irq) & 0xFF
        if s.index:
            irq += 8
        self.acked.append(irq)

    @staticmethod
    def pic_set_irq1(s: KvmKpicState, irq: int, level: int) -> int:
        """pic_set_irq1: latch *level* on pin *irq* of chip *s*. Level-triggered (ELCR bit
        set): IRR follows the line. Edge-triggered: a 0->1 change of ``last_irr`` sets IRR.

        Returns -1 when the pin is masked in IMR; otherwise 0 when an edge (or a high level)
        found IRR already set -- coalesced -- and 1 in every other case, including a lowered
        line and a raise of an edge line that is already high (no new edge: ``ret`` keeps its
        initial 1)."""
        mask = 1 << irq
        ret = 1
        if s.elcr & mask:  # level triggered
            if level:
                ret = 0 if s.irr & mask else 1
                s.irr |= mask
                s.last_irr |= mask
            else:
                s.irr &= ~mask & 0xFF
                s.last_irr &= ~mask & 0xFF
        elif level:  # edge triggered
            if not s.last_irr & mask:
                ret = 0 if s.irr & mask else 1
                s.irr |= mask
            s.last_irr |= mask
        else:
            s.last_irr &= ~mask & 0xFF
        return -1 if s.imr & mask else ret

    @staticmethod
    def get_priority(s: KvmKpicState, mask: int) -> int:
        """get_priority: the highest priority (0 = highest) set in *mask*, counted from the
        rotation point ``priority_add``; 8 if *mask* is empty."""
        if mask == 0:
            return 8
        priority = 0
        while not mask & (1 << ((priority + s.priority_add) & 7)):
            priority += 1
        return priority

    def pic_get_irq(self, s: KvmKpicState) -> int:
        """pic_get_irq: the pin chip *s* wants to interrupt with, or -1. An unmasked IRR bit
        must beat every ISR bit in priority; in special fully nested mode the master ignores
        its ISR bit 2 (the slave). ``special_mask`` is never consulted: KVM stores it only."""
        mask = s.irr & ~s.imr
        priority = self.get_priority(s, mask)
        if priority == 8:
            return -1
        mask = s.isr
        if s.special_fully_nested_mode and s.index == 0:
            mask &= ~(1 << 2)
        cur_priority = self.get_priority(s, mask)
        if priority < cur_priority:
            return (priority + s.priority_add) & 7
        return -1

    def pic_irq_request(self, level: int) -> None:
        """pic_irq_request: drive the INTR output. A wakeup is due whenever the output was
        low before, even if it stays low."""
        if not self.output:
            self.wakeup_needed = True
        self.output = level

    def pic_update_irq(self) -> None:
        """pic_update_irq: a slave request pulses master pin 2 (``pic_set_irq1`` 1 then 0:
        IRR bit 2 set if it is edge-triggered and ``last_irr`` bit 2 clear, cleared if it is
        level-triggered; ``last_irr`` bit 2 always ends clear), then the master's request
        becomes the output."""
        master, slave = self.pics
        if self.pic_get_irq(slave) >= 0:
            self.pic_set_irq1(master, 2, 1)
            self.pic_set_irq1(master, 2, 0)
        self.pic_irq_request(1 if self.pic_get_irq(master) >= 0 else 0)

    def kvm_pic_update_irq(self) -> None:
        """kvm_pic_update_irq: pic_update_irq under the lock (KVM_SET_IRQCHIP calls it for
        every chip id, the IOAPIC's included)."""
        self.pic_update_irq()

    def _kvm_irq_line_state(self, irq: int, irq_source_id: int, level: int) -> int:
        """__kvm_irq_line_state (arch/x86/include/asm/kvm_host.h): the line is the OR of its
        sources; *level* sets or clears this source's bit."""
        if level:
            self.irq_states[irq] |= 1 << irq_source_id
        else:
            self.irq_states[irq] &= ~(1 << irq_source_id)
        return 1 if self.irq_states[irq] else 0

    def kvm_pic_set_irq(self, irq: int, irq_source_id: int, level: int) -> int:
        """kvm_pic_set_irq: source *irq_source_id* drives PIC pin *irq* (0-15) to *level*
        (any non-zero value is high). Returns pic_set_irq1's result for the OR of the sources:
        -1 masked, 0 coalesced, 1 otherwise; kvm_set_irq then adds the IOAPIC's result
        (:func:`kvm_set_irq_status`). Emits trace_kvm_pic_set_irq.

        KVM WARNs and returns -1 for a pin outside 0-15; the model raises ValueError, as it
        does for a source id that is not a bit of an unsigned long."""
        if not 0 <= irq < PIC_NUM_PINS:
            raise ValueError(f"PIC pin {irq} is not 0-{PIC_NUM_PINS - 1}")
        if not 0 <= irq_source_id < BITS_PER_LONG:
            raise ValueError(f"irq_source_id {irq_source_id} is not 0-{BITS_PER_LONG - 1}")
        irq_level = self._kvm_irq_line_state(irq, irq_source_id, level)
        s = self.pics[irq >> 3]
        ret = self.pic_set_irq1(s, irq & 7, irq_level)
        self.pic_update_irq()
        if self.trace is not None:
            self.trace.kvm_pic_set_irq(irq >> 3, irq & 7, s.elcr, s.imr, ret == 0)
        return ret

    def kvm_pic_clear_all(self, irq_source_id: int) -> None:
        """kvm_pic_clear_all: forget *irq_source_id* on every pin (no level change is
        applied). KVM used it only for the PIT's source; the 2025 IRQ cleanup ("KVM: x86:
        Don't clear PIT's IRQ line status when destroying PIT") removed it, so a 6.18 kernel
        has no such function."""
        if not 0 <= irq_source_id < BITS_PER_LONG:
            raise ValueError(f"irq_source_id {irq_source_id} is not 0-{BITS_PER_LONG - 1}")
        for i in range(PIC_NUM_PINS):
            self.irq_states[i] &= ~(1 << irq_source_id)

    def pic_intack(self, s: KvmKpicState, irq: int) -> None:
        """pic_intack: the CPU acknowledges *irq*: ISR bit set, IRR bit cleared only if the
        pin is edge-triggered; in auto-EOI mode the ISR bit goes at once (rotating first if
        ``rotate_on_auto_eoi``)."""
        s.isr |= 1 << irq
        if not s.elcr & (1 << irq):
            s.irr &= ~(1 << irq) & 0xFF
        if s.auto_eoi:
            if s.rotate_on_auto_eoi:
                s.priority_add = (irq + 1) & 7
            self.pic_clear_isr(s, irq)

    def kvm_pic_read_irq(self) -> int:
        """kvm_pic_read_irq: the vector of an ExtINT injection (``kvm_cpu_get_extint``).

        Clears the output first, acknowledges the master's pin and, through IRQ 2, the
        slave's. Nothing on the master: spurious IRQ 7 (``irq_base`` + 7, nothing
        acknowledged); the master says 2 but the slave has nothing: the slave's spurious IRQ
        7. The result is ``irq_base + pin`` as an int, which can pass 255 for a state loaded
        with KVM_SET_IRQCHIP; KVM's caller stores it in a u8."""
        master, slave = self.pics
        self.output = 0
        irq = self.pic_get_irq(master)
        if irq >= 0:
            self.pic_intack(master, irq)
            if irq == 2:
                irq2 = self.pic_get_irq(slave)
                if irq2 >= 0:
                    self.pic_intack(slave, irq2)
                else:
                    irq2 = 7  # spurious IRQ on the slave
                intno = slave.irq_base + irq2
            else:
                intno = master.irq_base + irq
        else:
            intno = master.irq_base + 7  # spurious IRQ on the master
        self.pic_update_irq()
        return intno

    def _kvm_pic_reset(self, s: KvmKpicState) -> None:
        """kvm_pic_reset (ICW1): pending edges dropped (level-triggered IRR bits stay),
        IMR/rotation/special mask/read select cleared, AEOI and SFNM cleared unless ICW4 is
        coming, ``init_state`` 1. ISR, ``irq_base``, ``poll`` and ``rotate_on_auto_eoi`` are
        kept. If some vCPU accepts PIC interrupts, each dropped edge also clears its ISR bit
        and is acked (pic_clear_isr). There is no pic_update_irq: the output stays as it
        was until the next update."""
        edge_irr = s.irr & ~s.elcr & 0xFF
        s.last_irr = 0
        s.irr &= s.elcr
        s.imr = 0
        s.priority_add = 0
        s.special_mask = 0
        s.read_reg_select = 0
        if not s.init4:
            s.special_fully_nested_mode = 0
            s.auto_eoi = 0
        s.init_state = 1
        if not self.accept_pic_intr:
            return
        for irq in range(PIC_NUM_PINS // 2):
            if edge_irr & (1 << irq):
                self.pic_clear_isr(s, irq)

    def kvm_pic_reset(self, chip: int | None = None) -> None:
        """kvm_pic_reset on chip *chip* (0 master, 1 slave), or on both, master first, for
        None. KVM itself runs it only for an ICW1 write (see :meth:`pic_ioport_write`)."""
        for s in self.pics if chip is None else (self.pics[self._chip(chip)],):
            self._kvm_pic_reset(s)

    # ------------------------------------------------------------------ guest port I/O
    @staticmethod
    def _picdev_claims(port: int, size: int) -> None:
        """kvm_io_bus_cmp: an access reaches a PIC device only if it lies inside one of the
        2-port windows kvm_pic_init registers; any other access is a KVM_EXIT_IO to
        userspace, which the caller must not send here."""
        if size not in (1, 2, 4):
            raise ValueError(f"port I/O size must be 1, 2 or 4, not {size}")
        for base in _PICDEV_WINDOWS:
            if base <= port and port + size <= base + 2:
                return
        raise ValueError(f"a {size}-byte access to port {port:#x} is not claimed by the "
                         f"in-kernel PIC (KVM exits to userspace)")

    @staticmethod
    def _check_value(value: int, size: int) -> None:
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit in {size} byte(s)")

    def picdev_write(self, port: int, value: int, size: int = 1) -> None:
        """picdev_write: an OUT to a PIC or ELCR port. An access that is not one byte is
        dropped ("non byte write")."""
        self._picdev_claims(port, size)
        self._check_value(value, size)
        if size != 1:
            return
        if port in PIC_ELCR_PORTS:
            self.elcr_ioport_write(port, value)
        else:
            self.pic_ioport_write(port, value)

    def picdev_read(self, port: int, size: int = 1) -> int:
        """picdev_read: an IN from a PIC or ELCR port. An access that is not one byte reads
        0 ("non byte read") and changes nothing."""
        self._picdev_claims(port, size)
        if size != 1:
            return 0
        if port in PIC_ELCR_PORTS:
            return self.elcr_ioport_read(port)
        return self.pic_ioport_read(port)

    def pic_ioport_write(self, port: int, value: int, size: int = 1) -> None:
        """pic_ioport_write: an OUT to 0x20/0x21 (master) or 0xA0/0xA1 (slave).

        Even port: ICW1 (bit 4: ``kvm_pic_reset``, ``init4`` from bit 0; single mode and
        level mode are not supported and only logged), OCW3 (bit 3: poll, read IRR/ISR
        select, special mask), else OCW2 (command = bits 7-5: 0/4 clear/set rotate in AEOI,
        1 non-specific EOI, 5 rotate on non-specific EOI, 3 specific EOI, 6 set priority, 7
        rotate on specific EOI, 2 no-op). Odd port by ``init_state``: 0 OCW1 (IMR, mask
        notifiers, pic_update_irq), 1 ICW2 (``irq_base`` = value & 0xF8), 2 ICW3 (ignored;
        to ICW4 if ``init4``), 3 ICW4 (SFNM bit 4, AEOI bit 1); other values (only
        KVM_SET_IRQCHIP makes them) ignore the write."""
        if port not in PIC_MASTER_PORTS + PIC_SLAVE_PORTS:
            raise ValueError(f"port {port:#x} is not a PIC command/data port")
        if size != 1:
            self.picdev_write(port, value, size)
            return
        self._check_value(value, 1)
        s = self.pics[port >> 7]
        val = value
        if port & 1 == 0:
            if val & 0x10:
                s.init4 = val & 1
                self._kvm_pic_reset(s)
            elif val & 0x08:
                if val & 0x04:
                    s.poll = 1
                if val & 0x02:
                    s.read_reg_select = val & 1
                if val & 0x40:
                    s.special_mask = (val >> 5) & 1
            else:
                cmd = val >> 5
                if cmd in (0, 4):
                    s.rotate_on_auto_eoi = cmd >> 2
                elif cmd in (1, 5):  # end of interrupt
                    priority = self.get_priority(s, s.isr)
                    if priority != 8:
                        irq = (priority + s.priority_add) & 7
                        if cmd == 5:
                            s.priority_add = (irq + 1) & 7
                        self.pic_clear_isr(s, irq)
                        self.pic_update_irq()
                elif cmd == 3:
                    self.pic_clear_isr(s, val & 7)
                    self.pic_update_irq()
                elif cmd == 6:
                    s.priority_add = (val + 1) & 7
                    self.pic_update_irq()
                elif cmd == 7:
                    irq = val & 7
                    s.priority_add = (irq + 1) & 7
                    self.pic_clear_isr(s, irq)
                    self.pic_update_irq()
                # cmd 2: no operation
        elif s.init_state == 0:  # normal mode: OCW1
            imr_diff = s.imr ^ val
            off = 8 * s.index
            s.imr = val
            for irq in range(PIC_NUM_PINS // 2):
                if imr_diff & (1 << irq):
                    self.mask_notified.append((irq + off, bool(s.imr & (1 << irq))))
            self.pic_update_irq()
        elif s.init_state == 1:
            s.irq_base = val & 0xF8
            s.init_state = 2
        elif s.init_state == 2:
            s.init_state = 3 if s.init4 else 0
        elif s.init_state == 3:
            s.special_fully_nested_mode = (val >> 4) & 1
            s.auto_eoi = (val >> 1) & 1
            s.init_state = 0

    def pic_poll_read(self, s: KvmKpicState, addr1: int) -> int:
        """pic_poll_read: a read in poll mode acknowledges and ends the pending interrupt in
        one go (IRR bit and ISR bit cleared, acked) and returns 0x80 | its pin (bit 7 "there
        is an interrupt", as the 8259A poll word has it: "KVM: x86: Adjust return value of
        pic_poll_read()", 2023), or 0x07 if there is none. A poll of the slave also clears
        the master's IRR and ISR bit 2; a poll of the master that finds pin 2 skips the
        pic_update_irq."""
        ret = self.pic_get_irq(s)
        if ret >= 0:
            if addr1 >> 7:
                master = self.pics[0]
                master.isr &= ~(1 << 2) & 0xFF
                master.irr &= ~(1 << 2) & 0xFF
            s.irr &= ~(1 << ret) & 0xFF
            self.pic_clear_isr(s, ret)
            if addr1 >> 7 or ret != 2:
                self.pic_update_irq()
            ret |= 0x80
        else:
            ret = 0x07
            self.pic_update_irq()
        return ret

    def pic_ioport_read(self, port: int, size: int = 1) -> int:
        """pic_ioport_read: an IN from 0x20/0x21 or 0xA0/0xA1. With ``poll`` set (OCW3) either
        port polls (pic_poll_read) and ends poll mode, even when the poll found nothing;
        otherwise the even port reads ISR or IRR (``read_reg_select``), the odd port IMR."""
        if port not in PIC_MASTER_PORTS + PIC_SLAVE_PORTS:
            raise ValueError(f"port {port:#x} is not a PIC command/data port")
        if size != 1:
            return self.picdev_read(port, size)
        s = self.pics[port >> 7]
        if s.poll:
            ret = self.pic_poll_read(s, port)
            s.poll = 0
        elif port & 1 == 0:
            ret = s.isr if s.read_reg_select else s.irr
        else:
            ret = s.imr
        return ret

    def elcr_ioport_write(self, port: int, value: int, size: int = 1) -> None:
        """elcr_ioport_write: an OUT to 0x4D0 (master) / 0x4D1 (slave): ELCR = value &
        ``elcr_mask``. Nothing is re-evaluated (no pic_update_irq)."""
        if port not in PIC_ELCR_PORTS:
            raise ValueError(f"port {port:#x} is not an ELCR port")
        if size != 1:
            self.picdev_write(port, value, size)
            return
        self._check_value(value, 1)
        s = self.pics[port & 1]
        s.elcr = value & s.elcr_mask

    def elcr_ioport_read(self, port: int, size: int = 1) -> int:
        """elcr_ioport_read: an IN from 0x4D0 / 0x4D1 reads ELCR."""
        if port not in PIC_ELCR_PORTS:
            raise ValueError(f"port {port:#x} is not an ELCR port")
        if size != 1:
            return self.picdev_read(port, size)
        return self.pics[port & 1].elcr

    # ------------------------------------------------------------------ KVM_GET/SET_IRQCHIP
    @staticmethod
    def _chip(chip: int) -> int:
        if chip not in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE):
            raise ValueError(f"chip {chip} is not a PIC (0 master, 1 slave)")
        return chip

    def get_state(self, chip: int) -> bytes:
        """kvm_vm_ioctl_get_irqchip for KVM_IRQCHIP_PIC_MASTER (0) / _SLAVE (1): the 16
        bytes of struct kvm_pic_state."""
        return self.pics[self._chip(chip)].to_bytes()

    def set_state(self, chip: int, data: bytes) -> None:
        """kvm_vm_ioctl_set_irqchip for a PIC: copy the 16 bytes as they are (KVM checks
        nothing -- an ``elcr_mask`` or ``init_state`` no guest could write is kept), then
        kvm_pic_update_irq. That update can change the *master*: a slave with a request
        pulses master pin 2, so reading the master back may differ from what was written
        in IRR and ``last_irr`` bit 2."""
        s = self.pics[self._chip(chip)]
        data = bytes(data)
        if len(data) != KVM_PIC_STATE_SIZE:
            raise ValueError(f"a PIC state is {KVM_PIC_STATE_SIZE} bytes, got {len(data)}")
        s.load(data)
        self.kvm_pic_update_irq()

    def __repr__(self) -> str:
        return f"KvmPic(output={self.output}, master={self.pics[0]!r}, slave={self.pics[1]!r})"
