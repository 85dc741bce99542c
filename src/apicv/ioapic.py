"""KVM's in-kernel IOAPIC (arch/x86/kvm/ioapic.c, ioapic.h; the 6.18 version).

24 pins behind IOREGSEL/IOWIN at 0xFEC00000; redirection entries stored as the raw 64-bit
``union kvm_ioapic_redirect_entry``; the IRR with per-source line states; edge coalescing;
level remote IRR cleared by the EOI broadcast (not with SPIV's directed-EOI bit); re-assertion
of a still-high level line at EOI with KVM's EOI-storm guard (the 10000th successive
re-service is deferred 10 ms); RTC (GSI 8) EOI tracking for coalescing reports; the AVIC-era
lazy EOI update for edge pins while APICv is activated; the EOI-exit scan
(``kvm_ioapic_scan_entry``); and ``struct kvm_ioapic_state`` for KVM_GET/SET_IRQCHIP.

The IOAPIC is a VM-level device that sees the VM only through its narrow port
(:class:`apicv.vm.DevicePort`, or any object with the same attributes -- tests use a fake):
``deliver`` (``kvm_irq_delivery_to_apic``), ``dest_vcpus`` (``kvm_bitmap_or_dest_vcpus``),
``scan_ioapic`` (``kvm_make_scan_ioapic_request(_mask)``), ``apicv_activated``, ``clock`` (now,
the delayed-EOI timer), ``kvm`` (VM-wide settings for destination matching) and ``vcpus`` (the
LAPICs it must match). It never touches a vCPU's requests or kicks directly.
"""

from __future__ import annotations

import struct

from . import apicdef as A
from .apic_map import kvm_apic_match_dest
from .irq_routing import kvm_scan_ioapic_irq
from .uapi import (
    KVM_IOAPIC_DEFAULT_BASE_ADDRESS,
    KVM_IOAPIC_NUM_PINS,
    KVM_IOAPIC_STATE_SIZE,
    KVM_IRQCHIP_IOAPIC,
)

IOAPIC_NUM_PINS = KVM_IOAPIC_NUM_PINS
IOAPIC_VERSION_ID = 0x11
IOAPIC_MEM_LENGTH = 0x100
IOAPIC_REG_SELECT = 0x00
IOAPIC_REG_WINDOW = 0x10
IOAPIC_REG_APIC_ID = 0x00
IOAPIC_REG_VERSION = 0x01
IOAPIC_REG_ARB_ID = 0x02
RTC_GSI = 8
IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT = 10000
EOI_INJECT_DELAY_NS = 10_000_000  # schedule_delayed_work(HZ / 100)

# union kvm_ioapic_redirect_entry
RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE_SHIFT = 8
RTE_DEST_MODE = 1 << 11  # 1: logical
RTE_DELIVERY_STATUS = 1 << 12  # read-only, never set by KVM
RTE_POLARITY = 1 << 13  # stored, unused
RTE_REMOTE_IRR = 1 << 14  # read-only
RTE_TRIG_MODE = 1 << 15  # 1: level
RTE_MASK = 1 << 16
RTE_DEST_SHIFT = 56
IOAPIC_EDGE_TRIG = 0
IOAPIC_LEVEL_TRIG = 1
_U64 = (1 << 64) - 1
_STATE = struct.Struct("<QIIII24Q")
assert _STATE.size == KVM_IOAPIC_STATE_SIZE


def rte_fields(e: int) -> dict[str, int]:
    """Decode a redirection entry (for display and tests)."""
    return {
        "vector": e & RTE_VECTOR, "delivery_mode": (e >> 8) & 7, "dest_mode": (e >> 11) & 1,
        "delivery_status": (e >> 12) & 1, "polarity": (e >> 13) & 1,
        "remote_irr": (e >> 14) & 1, "trig_mode": (e >> 15) & 1, "mask": (e >> 16) & 1,
        "dest_id": (e >> 56) & 0xFF,
    }


def kvm_lapic_irq_dest_mode(logical: bool) -> int:
    return A.APIC_DEST_LOGICAL if logical else A.APIC_DEST_PHYSICAL


class DestMap:
    """struct dest_map: the vCPUs (by vcpu_id) that accepted the RTC interrupt, and the vector
    each accepted (``dest_map->map`` / ``dest_map->vectors``)."""

    __slots__ = ("map",)

    def __init__(self) -> None:
        self.map: dict[int, int] = {}

    def record(self, vcpu_id: int, vector: int) -> None:
        """__apic_accept_irq(): __set_bit(vcpu_id, map); vectors[vcpu_id] = vector."""
        self.map[vcpu_id] = vector


class RtcStatus:
    """struct rtc_status: how many LAPICs still owe an EOI for the last RTC interrupt."""

    __slots__ = ("pending_eoi", "dest_map")

    def __init__(self) -> None:
        self.pending_eoi = 0
        self.dest_map = DestMap()


class KvmIoapic:
    """struct kvm_ioapic and the functions of ioapic.c that operate on it."""

    def __init__(self, port) -> None:
        self.port = port
        self.base_address = KVM_IOAPIC_DEFAULT_BASE_ADDRESS
        self.ioregsel = 0
        self.id = 0
        self.irr = 0
        self.pad = 0
        self.redirtbl = [0] * IOAPIC_NUM_PINS
        self.irq_states = [0] * IOAPIC_NUM_PINS  # per pin: bitmask of irq_source_ids
        self.irr_delivered = 0
        self.irq_eoi = [0] * IOAPIC_NUM_PINS
        self.rtc_status = RtcStatus()
        self.eoi_inject = port.clock.timer(self._eoi_inject_fired)
        self.trace = None
        self.kvm_ioapic_reset()

    # ------------------------------------------------------------------ reset / state
    def kvm_ioapic_reset(self) -> None:
        """kvm_ioapic_reset(): every pin masked (other RTE bits kept), base 0xFEC00000."""
        self.eoi_inject.cancel()
        self.redirtbl = [e | RTE_MASK for e in self.redirtbl]
        self.base_address = KVM_IOAPIC_DEFAULT_BASE_ADDRESS
        self.ioregsel = 0
        self.irr = 0
        self.irr_delivered = 0
        self.id = 0
        self.irq_eoi = [0] * IOAPIC_NUM_PINS
        self.rtc_irq_eoi_tracking_reset()

    def kvm_get_ioapic(self) -> bytes:
        """kvm_get_ioapic(): struct kvm_ioapic_state, with irr &= ~irr_delivered."""
        return _STATE.pack(self.base_address, self.ioregsel, self.id,
                           self.irr & ~self.irr_delivered & 0xFFFFFFFF, self.pad,
                           *self.redirtbl)

    def kvm_set_ioapic(self, data: bytes) -> None:
        """kvm_set_ioapic(): copy the state as given (base address, ID and every RTE bit
        included), clear irr and irr_delivered, request an IOAPIC scan on every vCPU and
        re-inject the saved IRR (kvm_ioapic_inject_all)."""
        (self.base_address, self.ioregsel, self.id, irr, self.pad,
         *rtes) = _STATE.unpack(bytes(data[:KVM_IOAPIC_STATE_SIZE]))
        self.redirtbl = list(rtes)
        self.irr = 0
        self.irr_delivered = 0
        self.port.scan_ioapic()
        self.kvm_ioapic_inject_all(irr)

    def kvm_ioapic_inject_all(self, irr: int) -> None:
        self.rtc_irq_eoi_tracking_reset()
        for idx in range(IOAPIC_NUM_PINS):
            if irr >> idx & 1:
                self.ioapic_set_irq(idx, 1, True)
        self.kvm_rtc_eoi_tracking_restore_all()

    # ------------------------------------------------------------------ RTC EOI tracking
    def rtc_irq_eoi_tracking_reset(self) -> None:
        self.rtc_status.pending_eoi = 0
        self.rtc_status.dest_map.map.clear()

    def rtc_status_pending_eoi_check_valid(self) -> None:
        if self.rtc_status.pending_eoi < 0:  # WARN_ON
            self.kvm_rtc_eoi_tracking_restore_all()

    def __rtc_irq_eoi_tracking_restore_one(self, vcpu) -> None:
        e = self.redirtbl[RTC_GSI]
        apic = vcpu.apic
        if not kvm_apic_match_dest(self.port.kvm, apic, None, A.APIC_DEST_NOSHORT,
                                   (e >> RTE_DEST_SHIFT) & 0xFF,
                                   kvm_lapic_irq_dest_mode(bool(e & RTE_DEST_MODE))):
            return
        vector = e & RTE_VECTOR
        new_val = apic.kvm_apic_pending_eoi(vector)
        dmap = self.rtc_status.dest_map.map
        old_val = vcpu.vcpu_id in dmap
        if new_val == old_val:
            return
        if new_val:
            dmap[vcpu.vcpu_id] = vector
            self.rtc_status.pending_eoi += 1
        else:
            del dmap[vcpu.vcpu_id]
            self.rtc_status.pending_eoi -= 1
            self.rtc_status_pending_eoi_check_valid()

    def kvm_rtc_eoi_tracking_restore_one(self, vcpu) -> None:
        """After KVM_SET_LAPIC: does this vCPU still owe the RTC an EOI?"""
        self.__rtc_irq_eoi_tracking_restore_one(vcpu)

    def kvm_rtc_eoi_tracking_restore_all(self) -> None:
        self.rtc_irq_eoi_tracking_reset()
        for vcpu in self.port.vcpus:
            self.__rtc_irq_eoi_tracking_restore_one(vcpu)

    def rtc_irq_eoi(self, vcpu, vector: int) -> None:
        dmap = self.rtc_status.dest_map.map
        if dmap.get(vcpu.vcpu_id, -1) == vector:
            del dmap[vcpu.vcpu_id]
            self.rtc_status.pending_eoi -= 1
            self.rtc_status_pending_eoi_check_valid()

    def rtc_irq_check_coalesced(self) -> bool:
        return self.rtc_status.pending_eoi > 0

    def ioapic_lazy_update_eoi(self, irq: int) -> None:
        """Edge pins while APICv is activated (AVIC accelerates edge EOIs): the first
        destination vCPU with no pending EOI for the vector settles the RTC tracking. KVM
        passes the raw dest_mode bit here (a logical destination still matches logically)."""
        e = self.redirtbl[irq]
        vector = e & RTE_VECTOR
        kvm = self.port.kvm
        for vcpu in self.port.vcpus:
            if (not kvm_apic_match_dest(kvm, vcpu.apic, None, A.APIC_DEST_NOSHORT,
                                        (e >> RTE_DEST_SHIFT) & 0xFF, (e >> 11) & 1)
                    or vcpu.apic.kvm_apic_pending_eoi(vector)):
                continue
            self.rtc_irq_eoi(vcpu, vector)
            break

    # ------------------------------------------------------------------ lines
    def kvm_ioapic_set_irq(self, irq: int, irq_source_id: int, level: int,
                           line_status: bool) -> int:
        """kvm_ioapic_set_irq(): the line is the OR of every source's level."""
        if not 0 <= irq < IOAPIC_NUM_PINS:
            raise ValueError(f"IOAPIC pin {irq} out of range")
        states = self.irq_states
        if level:
            states[irq] |= 1 << irq_source_id
        else:
            states[irq] &= ~(1 << irq_source_id)
        return self.ioapic_set_irq(irq, 1 if states[irq] else 0, line_status)

    def kvm_ioapic_clear_all(self, irq_source_id: int) -> None:
        self.irq_states = [s & ~(1 << irq_source_id) for s in self.irq_states]

    def ioapic_set_irq(self, irq: int, irq_level: int, line_status: bool) -> int:
        """ioapic_set_irq(): 1 for a lowered line, 0 when coalesced, else what delivery
        returned (-1 masked or waiting for EOI, the number of LAPICs that accepted)."""
        entry = self.redirtbl[irq]
        mask = 1 << irq
        edge = not entry & RTE_TRIG_MODE
        if not irq_level:
            self.irr &= ~mask
            ret = 1
        else:
            if edge and self.port.apicv_activated():
                self.ioapic_lazy_update_eoi(irq)
            if irq == RTC_GSI and line_status and self.rtc_irq_check_coalesced():
                ret = 0
            else:
                old_irr = self.irr
                self.irr |= mask
                if edge:
                    self.irr_delivered &= ~mask
                if edge and old_irr == self.irr:
                    ret = 0
                else:
                    ret = self.ioapic_service(irq, line_status)
        tr = self.trace
        if tr is not None:
            tr.kvm_ioapic_set_irq(entry, irq, ret == 0)
        return ret

    def ioapic_service(self, irq: int, line_status: bool) -> int:
        """ioapic_service(): -1 if masked or a level pin waiting for its EOI; otherwise deliver
        (kvm_irq_delivery_to_apic) and set remote IRR for a level pin that reached anyone."""
        e = self.redirtbl[irq]
        level_trig = bool(e & RTE_TRIG_MODE)
        if e & RTE_MASK or (level_trig and e & RTE_REMOTE_IRR):
            return -1
        if not level_trig:
            self.irr_delivered |= 1 << irq
        args = (None, ((e >> RTE_DELIVERY_MODE_SHIFT) & 7) << 8, e & RTE_VECTOR,
                (e >> RTE_DEST_SHIFT) & 0xFF, kvm_lapic_irq_dest_mode(bool(e & RTE_DEST_MODE)),
                1, int(level_trig), 0, 0)
        if irq == RTC_GSI and line_status:
            ret = self.port.deliver(*args, dest_map=self.rtc_status.dest_map)
            self.rtc_status.pending_eoi = max(ret, 0)
        else:
            ret = self.port.deliver(*args)
        if ret and level_trig:
            self.redirtbl[irq] = e | RTE_REMOTE_IRR
        return ret

    # ------------------------------------------------------------------ EOI
    def kvm_ioapic_update_eoi(self, vcpu, vector: int, trigger_mode: int) -> None:
        """kvm_ioapic_update_eoi(): the EOI broadcast from a LAPIC."""
        self.rtc_irq_eoi(vcpu, vector)
        for pin in range(IOAPIC_NUM_PINS):
            if self.redirtbl[pin] & RTE_VECTOR == vector:
                self.kvm_ioapic_update_eoi_one(vcpu, trigger_mode, pin)

    def kvm_ioapic_update_eoi_one(self, vcpu, trigger_mode: int, pin: int) -> None:
        # ack notifiers first (resamplers, the PIT), for edge pins too; remote IRR is cleared
        # only after them
        self.port.notify_acked(KVM_IRQCHIP_IOAPIC, pin)
        if (trigger_mode != IOAPIC_LEVEL_TRIG
                or vcpu.apic.kvm_lapic_get_reg(A.APIC_SPIV) & A.APIC_SPIV_DIRECTED_EOI):
            return
        e = self.redirtbl[pin] & ~RTE_REMOTE_IRR
        self.redirtbl[pin] = e
        if not e & RTE_MASK and self.irr >> pin & 1:
            self.irq_eoi[pin] += 1
            if self.irq_eoi[pin] == IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT:
                # an interrupt storm: real hardware does not re-deliver during the EOI
                # broadcast; let the guest make slow progress
                if not self.eoi_inject.active:
                    self.eoi_inject.start(self.port.clock.now + EOI_INJECT_DELAY_NS)
                self.irq_eoi[pin] = 0
                tr = self.trace
                if tr is not None:
                    tr.kvm_ioapic_delayed_eoi_inj(e)
            else:
                self.ioapic_service(pin, False)
        else:
            self.irq_eoi[pin] = 0

    def _eoi_inject_fired(self) -> bool:
        """kvm_ioapic_eoi_inject_work(): re-service level pins still asserted."""
        for i in range(IOAPIC_NUM_PINS):
            e = self.redirtbl[i]
            if not e & RTE_TRIG_MODE:
                continue
            if self.irr >> i & 1 and not e & RTE_REMOTE_IRR:
                self.ioapic_service(i, False)
        return False  # (the clock's after_fire hook delivers to kicked vCPUs)

    # ------------------------------------------------------------------ scan
    def kvm_ioapic_scan_entry(self, vcpu) -> int:
        """The vectors this vCPU must report EOIs for: the RTC vector it owes, and the vector
        of every level pin, every pin with an ack notifier, and the RTC pin, aimed at it or
        pending in its IRR/ISR (kvm_scan_ioapic_irq)."""
        handled = 0
        vid = vcpu.vcpu_id
        dmap = self.rtc_status.dest_map.map
        if vid in dmap:
            handled |= 1 << dmap[vid]
        kvm = self.port.kvm
        has_notifier = self.port.has_notifier
        for index, e in enumerate(self.redirtbl):
            if (e & RTE_TRIG_MODE or has_notifier(KVM_IRQCHIP_IOAPIC, index)
                    or index == RTC_GSI):
                handled = kvm_scan_ioapic_irq(
                    kvm, vcpu, (e >> RTE_DEST_SHIFT) & 0xFF,
                    kvm_lapic_irq_dest_mode(bool(e & RTE_DEST_MODE)), e & RTE_VECTOR, handled)
        return handled

    # ------------------------------------------------------------------ MMIO
    def ioapic_in_range(self, addr: int) -> bool:
        return self.base_address <= addr < self.base_address + IOAPIC_MEM_LENGTH

    def ioapic_mmio_read(self, addr: int, length: int) -> int | None:
        """ioapic_mmio_read(): None when the address is outside the IOAPIC's (possibly
        user-moved) range, so that the access goes to userspace (-EOPNOTSUPP)."""
        if not self.ioapic_in_range(addr):
            return None
        addr &= 0xFF
        if addr == IOAPIC_REG_SELECT:
            result = self.ioregsel
        elif addr == IOAPIC_REG_WINDOW:
            result = self.ioapic_read_indirect()
        else:
            result = 0
        if length == 8:
            return result
        return result & ((1 << (8 * length)) - 1)

    def ioapic_mmio_write(self, addr: int, length: int, value: int) -> bool:
        """ioapic_mmio_write(): 8- and 4-byte writes take the low dword."""
        if not self.ioapic_in_range(addr):
            return False
        data = value & (0xFFFFFFFF if length >= 4 else (1 << (8 * length)) - 1)
        addr &= 0xFF
        if addr == IOAPIC_REG_SELECT:
            self.ioregsel = data & 0xFF
        elif addr == IOAPIC_REG_WINDOW:
            self.ioapic_write_indirect(data)
        return True

    def ioapic_read_indirect(self) -> int:
        sel = self.ioregsel
        if sel == IOAPIC_REG_VERSION:
            return ((IOAPIC_NUM_PINS - 1) & 0xFF) << 16 | IOAPIC_VERSION_ID
        if sel in (IOAPIC_REG_APIC_ID, IOAPIC_REG_ARB_ID):
            return (self.id & 0xF) << 24
        index = ((sel - 0x10) & 0xFFFFFFFF) >> 1
        content = self.redirtbl[index] if index < IOAPIC_NUM_PINS else _U64
        return (content >> 32) & 0xFFFFFFFF if sel & 1 else content & 0xFFFFFFFF

    def ioapic_write_indirect(self, val: int) -> None:
        sel = self.ioregsel
        if sel in (IOAPIC_REG_VERSION, IOAPIC_REG_ARB_ID):
            return
        if sel == IOAPIC_REG_APIC_ID:
            self.id = (val >> 24) & 0xF
            return
        index = ((sel - 0x10) & 0xFFFFFFFF) >> 1
        if index >= IOAPIC_NUM_PINS:
            return
        old = self.redirtbl[index]
        if sel & 1:
            e = (old & 0xFFFFFFFF) | (val << 32)
        else:
            e = (old & ~0xFFFFFFFF & _U64) | val
        # read-only fields keep their values
        ro = RTE_REMOTE_IRR | RTE_DELIVERY_STATUS
        e = (e & ~ro) | (old & ro)
        if not e & RTE_TRIG_MODE:
            # Linux and Xen expect an edge-triggered entry to drop remote IRR (an explicit
            # EOI on IOAPICs without an EOI register)
            e &= ~RTE_REMOTE_IRR
        self.redirtbl[index] = e
        if (old ^ e) & RTE_MASK:
            self.port.fire_mask_notifiers(KVM_IRQCHIP_IOAPIC, index, bool(e & RTE_MASK))
        if e & RTE_TRIG_MODE and self.irr >> index & 1:
            self.ioapic_service(index, False)
        e = self.redirtbl[index]
        if (e >> RTE_DELIVERY_MODE_SHIFT) & 7 == A.APIC_DM_FIXED >> 8:
            dest_mode = kvm_lapic_irq_dest_mode(bool(e & RTE_DEST_MODE))
            vector = e & RTE_VECTOR
            idxs = self.port.dest_vcpus(A.APIC_DM_FIXED, vector,
                                                   (e >> RTE_DEST_SHIFT) & 0xFF, dest_mode)
            old_dest_id = (old >> RTE_DEST_SHIFT) & 0xFF
            if (old ^ e) & RTE_DEST_MODE or old_dest_id != (e >> RTE_DEST_SHIFT) & 0xFF:
                # the vCPUs of the previous destination too (KVM uses the new dest_mode)
                idxs |= self.port.dest_vcpus(A.APIC_DM_FIXED, vector, old_dest_id,
                                                        dest_mode)
            self.port.scan_ioapic(idxs)
        else:
            self.port.scan_ioapic()
