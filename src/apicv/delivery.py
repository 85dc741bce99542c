"""Interrupt routing to local APICs: ``kvm_irq_delivery_to_apic`` (fast path through the
optimized map, slow path over every vCPU), lowest-priority arbitration with vector hashing, ICR
IPIs (``kvm_apic_send_ipi``) and MSIs (``kvm_set_msi`` / ``kvm_set_msi_irq``).

An interrupt travels as plain integers (KVM's ``struct kvm_lapic_irq`` fields), so delivering
one allocates nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import apicdef as A
from .apic_map import ApicMap, kvm_apic_match_dest, kvm_vector_to_index
from .kvm_host import LogicalMode

if TYPE_CHECKING:
    from .arch import KvmArch
    from .lapic import LocalApic, SendIpi
    from .trace import Tracer

_LOWEST = A.APIC_DM_LOWEST
_NOT_HANDLED = None


class Router:
    """Routes interrupts for one VM. ``apics`` is in vCPU index order; ``map`` is the current
    optimized map (None when physical IDs alias)."""

    __slots__ = ("kvm", "apics", "map", "trace")

    def __init__(self, kvm: KvmArch) -> None:
        self.kvm = kvm
        self.apics: list[LocalApic] = []
        self.map: ApicMap | None = None
        self.trace: Tracer | None = None

    # ------------------------------------------------------------ fast path
    def kvm_irq_delivery_to_apic_fast(self, src: LocalApic | None, dm: int, vector: int,
                                      dest_id: int, dest_mode: int, level: int, trig: int,
                                      shorthand: int, rh: int, dest_map=None) -> int | None:
        """Returns the number of APICs that accepted, or None when the map cannot decide."""
        if shorthand == A.APIC_DEST_SELF:
            if src is None:
                return 0  # KVM_BUG_ON(!src)
            return src.kvm_apic_set_irq(dm, vector, level, trig, dest_map)
        m = self.map
        if shorthand or m is None:
            return _NOT_HANDLED
        # kvm_apic_is_broadcast_dest()
        kvm = self.kvm
        if kvm.x2apic_broadcast_quirk_disabled:
            if ((dest_id == A.APIC_BROADCAST and m.logical_mode != LogicalMode.X2APIC)
                    or dest_id == A.X2APIC_BROADCAST):
                return _NOT_HANDLED
        elif dest_id == (A.X2APIC_BROADCAST if src is not None and src.x2apic
                         else A.APIC_BROADCAST):
            return _NOT_HANDLED
        if dest_mode == A.APIC_DEST_PHYSICAL:
            if dest_id > m.max_apic_id:
                return 0
            dst = m.phys_map[dest_id]
            if dst is None:
                return 0
            return dst.kvm_apic_set_irq(dm, vector, level, trig, dest_map)
        found = m.get_logical_dest(dest_id)
        if found is None:
            return _NOT_HANDLED
        cluster, offset, bitmap = found
        if dm == _LOWEST or rh:
            if not kvm.vector_hashing:
                lowest = -1
                b = bitmap
                while b:
                    i = (b & -b).bit_length() - 1
                    b &= b - 1
                    cand = cluster[offset + i]
                    if cand is None:
                        continue
                    if lowest < 0 or (cand.arch.apic_arb_prio
                                      - cluster[offset + lowest].arch.apic_arb_prio) < 0:  # type: ignore[union-attr]
                        lowest = i
                bitmap = (1 << lowest) if lowest >= 0 else 0
            else:
                if not bitmap:
                    return 0
                idx = kvm_vector_to_index(vector, bitmap.bit_count(), bitmap)
                if cluster[offset + idx] is None:
                    kvm.disabled_lapic_found = True  # "Disabled LAPIC found during irq injection"
                    return 0
                bitmap = 1 << idx
        r = 0
        while bitmap:
            i = (bitmap & -bitmap).bit_length() - 1
            bitmap &= bitmap - 1
            dst = cluster[offset + i]
            if dst is not None:
                r += dst.kvm_apic_set_irq(dm, vector, level, trig, dest_map)
        return r

    # ------------------------------------------------------------ full routing
    def kvm_irq_delivery_to_apic(self, src: LocalApic | None, dm: int, vector: int,
                                 dest_id: int, dest_mode: int, level: int, trig: int,
                                 shorthand: int = 0, rh: int = 0, dest_map=None) -> int:
        """Deliver to every matching APIC; -1 when nothing matched, else how many accepted."""
        r = self.kvm_irq_delivery_to_apic_fast(src, dm, vector, dest_id, dest_mode, level,
                                               trig, shorthand, rh, dest_map)
        if r is not None:
            return r
        kvm = self.kvm
        if dest_mode == A.APIC_DEST_PHYSICAL and dest_id == 0xFF and (dm == _LOWEST or rh):
            dm = A.APIC_DM_FIXED  # "apic: phys broadcast and lowest prio" (rh stays set)
        lowest_prio = dm == _LOWEST or rh  # kvm_lowest_prio_delivery(), after the downgrade
        r = -1
        lowest: LocalApic | None = None
        candidates: list[int] = []
        for i, apic in enumerate(self.apics):
            if not apic.hw_enabled:
                continue
            if not kvm_apic_match_dest(kvm, apic, src, shorthand, dest_id, dest_mode):
                continue
            if not lowest_prio:
                if r < 0:
                    r = 0
                r += apic.kvm_apic_set_irq(dm, vector, level, trig, dest_map)
            elif apic.sw_enabled:
                if not kvm.vector_hashing:
                    if lowest is None or apic.arch.apic_arb_prio - lowest.arch.apic_arb_prio < 0:
                        lowest = apic
                else:
                    candidates.append(i)
        if candidates:
            lowest = self.apics[candidates[vector % len(candidates)]]
        if lowest is not None:
            r = lowest.kvm_apic_set_irq(dm, vector, level, trig, dest_map)
        return r

    def kvm_bitmap_or_dest_vcpus(self, dm: int, vector: int, dest_id: int, dest_mode: int,
                                 shorthand: int = 0, rh: int = 0) -> set[int]:
        """The vCPU indexes an interrupt would target (used by the IOAPIC scan)."""
        m = self.map
        out: set[int] = set()
        fast = None
        if not shorthand and m is not None:
            fast = self._map_dest_lapics(dm, vector, dest_id, dest_mode, rh)
        if fast is not None:
            for apic in fast:
                out.add(apic.arch.vcpu_idx)
            return out
        for i, apic in enumerate(self.apics):
            if apic.hw_enabled and kvm_apic_match_dest(self.kvm, apic, None, shorthand,
                                                       dest_id, dest_mode):
                out.add(i)
        return out

    def _map_dest_lapics(self, dm, vector, dest_id, dest_mode, rh):
        """kvm_apic_map_get_dest_lapic() without delivering: the APICs, or None if the slow
        path must decide."""
        m = self.map
        kvm = self.kvm
        if m is None:
            return None
        if kvm.x2apic_broadcast_quirk_disabled:
            if ((dest_id == A.APIC_BROADCAST and m.logical_mode != LogicalMode.X2APIC)
                    or dest_id == A.X2APIC_BROADCAST):
                return None
        elif dest_id == A.APIC_BROADCAST:
            return None
        if dest_mode == A.APIC_DEST_PHYSICAL:
            if dest_id > m.max_apic_id or m.phys_map[dest_id] is None:
                return []
            return [m.phys_map[dest_id]]
        found = m.get_logical_dest(dest_id)
        if found is None:
            return None
        cluster, offset, bitmap = found
        if (dm == _LOWEST or rh) and bitmap and kvm.vector_hashing:
            idx = kvm_vector_to_index(vector, bitmap.bit_count(), bitmap)
            return [cluster[offset + idx]] if cluster[offset + idx] is not None else []
        out = []
        while bitmap:
            i = (bitmap & -bitmap).bit_length() - 1
            bitmap &= bitmap - 1
            if cluster[offset + i] is not None:
                out.append(cluster[offset + i])
        return out

    # ------------------------------------------------------------ IPIs and MSIs
    def kvm_apic_send_ipi(self, ipi: SendIpi) -> int:
        """kvm_apic_send_ipi(): decode the ICR (kvm_icr_to_lapic_irq) and deliver."""
        icr_low = ipi.icr_low
        tr = self.trace
        if tr is not None:
            tr.kvm_apic_ipi(icr_low, ipi.dest_id)
        r = self.kvm_irq_delivery_to_apic(
            ipi.source, icr_low & A.APIC_MODE_MASK, icr_low & A.APIC_VECTOR_MASK, ipi.dest_id,
            icr_low & A.APIC_DEST_MASK, 1 if icr_low & A.APIC_INT_ASSERT else 0,
            icr_low & A.APIC_INT_LEVELTRIG, icr_low & A.APIC_SHORT_MASK, 0)
        if ipi.x2apic_icr is not None and tr is not None:
            tr.kvm_apic(1, A.APIC_ICR, ipi.x2apic_icr)
        return r

    def kvm_set_msi(self, address_lo: int, address_hi: int, data: int, level: int = 1) -> int:
        """kvm_set_msi(): -EINVAL for an invalid route, -1 when nothing matched, else the
        number of APICs that accepted."""
        kvm = self.kvm
        x2apic_format = kvm.x2apic_format
        if x2apic_format and address_hi & 0xFF:
            return -22
        if not level:
            return -1
        tr = self.trace
        if tr is not None:
            tr.kvm_msi_set_irq(address_lo | ((address_hi << 32) if x2apic_format else 0), data)
        # kvm_set_msi_irq()
        dest_id = (address_lo >> 12) & 0xFF
        if x2apic_format:
            dest_id |= address_hi & 0xFFFFFF00
        return self.kvm_irq_delivery_to_apic(
            None, data & A.APIC_MODE_MASK, data & 0xFF, dest_id,
            A.APIC_DEST_LOGICAL if address_lo & 4 else A.APIC_DEST_PHYSICAL,
            1, (data >> 15) & 1, 0, (address_lo >> 3) & 1)
