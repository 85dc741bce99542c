"""The optimized APIC map and destination matching (lapic.c): ``kvm_recalculate_apic_map``,
``kvm_apic_map_get_logical_dest``, ``kvm_apic_match_dest`` and its helpers.

The map reads the APICs' IDs, LDR/DFR and modes; it never changes an APIC. Which APICv inhibits
a recalculation implies is returned to the caller (the VM), which owns the inhibit mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import apicdef as A
from .kvm_host import LogicalMode

if TYPE_CHECKING:
    from .arch import KvmArch
    from .lapic import LocalApic


class ApicMap:
    """struct kvm_apic_map."""

    __slots__ = ("max_apic_id", "logical_mode", "phys_map", "xapic_flat_map",
                 "xapic_cluster_map")

    def __init__(self, max_apic_id: int) -> None:
        self.max_apic_id = max_apic_id
        self.logical_mode = LogicalMode.SW_DISABLED
        self.phys_map: list[LocalApic | None] = [None] * (max_apic_id + 1)
        self.xapic_flat_map: list[LocalApic | None] = [None] * 8
        self.xapic_cluster_map: list[list[LocalApic | None]] = [[None] * 4 for _ in range(16)]

    def get_logical_dest(self, dest_id: int):
        """kvm_apic_map_get_logical_dest(): (cluster list, offset, mask) or None when the map
        cannot answer (MAP_DISABLED). The cluster is a list with the 16-bit mask indexing it
        from *offset* (x2APIC clusters live in phys_map)."""
        mode = self.logical_mode
        if mode == LogicalMode.X2APIC:
            offset = (dest_id >> 16) * 16
            max_apic_id = self.max_apic_id
            if offset <= max_apic_id:
                cluster_size = min(max_apic_id - offset + 1, 16)
                return self.phys_map, offset, dest_id & (0xFFFF >> (16 - cluster_size))
            return self.phys_map, 0, 0
        if mode == LogicalMode.XAPIC_FLAT:
            return self.xapic_flat_map, 0, dest_id & 0xFF
        if mode == LogicalMode.XAPIC_CLUSTER:
            return self.xapic_cluster_map[(dest_id >> 4) & 0xF], 0, dest_id & 0xF
        if mode == LogicalMode.SW_DISABLED:
            # "Arbitrarily use the flat map so that @cluster isn't NULL."
            return self.xapic_flat_map, 0, 0
        return None  # MAP_DISABLED


@dataclass(slots=True)
class MapResult:
    """What a recalculation found: the new map (None = aliased physical IDs, slow path only)
    and the conditions behind the PHYSICAL_ID_ALIASED / LOGICAL_ID_ALIASED /
    APIC_ID_MODIFIED inhibits."""

    map: ApicMap | None
    physical_id_aliased: bool
    logical_id_aliased: bool
    xapic_id_mismatch: bool


def kvm_recalculate_phys_map(new: ApicMap, apic: LocalApic,
                             x2apic_format: bool) -> tuple[int, bool]:
    """Returns (0 or -EINVAL, xapic_id_mismatch)."""
    x2apic_id = apic.vcpu_id
    xapic_id = apic.kvm_xapic_id()
    mismatch = (not apic.x2apic) and xapic_id != (apic.vcpu_id & 0xFF)
    phys_map = new.phys_map
    if x2apic_format:
        # the "hotplug hack": address by x2APIC ID even in xAPIC mode; xAPIC aliases: first wins
        if apic.x2apic or x2apic_id > 0xFF:
            phys_map[x2apic_id] = apic
        if not apic.x2apic and phys_map[xapic_id] is None:
            phys_map[xapic_id] = apic
        return 0, mismatch
    physical_id = x2apic_id if apic.x2apic else xapic_id
    if phys_map[physical_id] is not None:
        return -22, mismatch
    phys_map[physical_id] = apic
    return 0, mismatch


def kvm_recalculate_logical_map(new: ApicMap, apic: LocalApic) -> None:
    if new.logical_mode == LogicalMode.MAP_DISABLED:
        return
    if not apic.sw_enabled:
        return
    ldr = apic.kvm_lapic_get_reg(A.APIC_LDR)
    if not ldr:
        return
    if apic.x2apic:
        logical_mode = LogicalMode.X2APIC
    else:
        ldr = (ldr >> 24) & 0xFF
        if apic.kvm_lapic_get_reg(A.APIC_DFR) == A.APIC_DFR_FLAT:
            logical_mode = LogicalMode.XAPIC_FLAT
        else:
            logical_mode = LogicalMode.XAPIC_CLUSTER
    # all software-enabled APICs must use the same mode for the optimized logical map
    if new.logical_mode == LogicalMode.SW_DISABLED:
        new.logical_mode = logical_mode
    elif new.logical_mode != logical_mode:
        new.logical_mode = LogicalMode.MAP_DISABLED
        return
    if apic.x2apic:
        return  # x2APIC clusters are looked up through phys_map
    found = new.get_logical_dest(ldr)
    if found is None:
        new.logical_mode = LogicalMode.MAP_DISABLED
        return
    cluster, _, mask = found
    if not mask:
        return
    idx = (mask & -mask).bit_length() - 1
    if mask & (mask - 1) or cluster[idx] is not None:
        new.logical_mode = LogicalMode.MAP_DISABLED
    else:
        cluster[idx] = apic


def kvm_recalculate_apic_map(kvm: KvmArch, apics: list[LocalApic]) -> MapResult:
    """Rebuild the map from every present (hardware-enabled) APIC, in vCPU index order."""
    max_id = 255
    for apic in apics:
        if apic.hw_enabled:
            max_id = max(max_id, apic.vcpu_id)
    new: ApicMap | None = ApicMap(max_id)
    mismatch_any = False
    for apic in apics:
        if not apic.hw_enabled:
            continue
        r, mismatch = kvm_recalculate_phys_map(new, apic, kvm.x2apic_format)  # type: ignore[arg-type]
        mismatch_any |= mismatch
        if r:
            new = None
            break
        kvm_recalculate_logical_map(new, apic)  # type: ignore[arg-type]
    return MapResult(
        map=new,
        physical_id_aliased=new is None,
        logical_id_aliased=new is None or new.logical_mode == LogicalMode.MAP_DISABLED,
        xapic_id_mismatch=mismatch_any,
    )


# ---------------------------------------------------------------- destination matching
def kvm_apic_broadcast(apic: LocalApic, mda: int) -> bool:
    return mda == (A.X2APIC_BROADCAST if apic.x2apic else A.APIC_BROADCAST)


def kvm_apic_match_physical_addr(apic: LocalApic, mda: int) -> bool:
    if kvm_apic_broadcast(apic, mda):
        return True
    # hotplug hack: match the x2APIC ID iff the ID can't be encoded as an xAPIC ID
    if apic.x2apic or mda > 0xFF:
        return mda == apic.vcpu_id
    return mda == apic.kvm_xapic_id()


def kvm_apic_match_logical_addr(apic: LocalApic, mda: int) -> bool:
    if kvm_apic_broadcast(apic, mda):
        return True
    logical_id = apic.kvm_lapic_get_reg(A.APIC_LDR)
    if apic.x2apic:
        return (logical_id >> 16) == (mda >> 16) and (logical_id & mda & 0xFFFF) != 0
    logical_id = (logical_id >> 24) & 0xFF
    dfr = apic.kvm_lapic_get_reg(A.APIC_DFR)
    if dfr == A.APIC_DFR_FLAT:
        return (logical_id & mda) != 0
    if dfr == A.APIC_DFR_CLUSTER:
        return (logical_id >> 4) == (mda >> 4) and (logical_id & mda & 0xF) != 0
    return False


def kvm_apic_mda(kvm: KvmArch, dest_id: int, source: LocalApic | None,
                 target: LocalApic) -> int:
    """The broadcast quirk: a non-IPI message to 0xFF reaches x2APIC targets as broadcast."""
    if (not kvm.x2apic_broadcast_quirk_disabled and source is None
            and dest_id == A.APIC_BROADCAST and target.x2apic):
        return A.X2APIC_BROADCAST
    return dest_id


def kvm_apic_match_dest(kvm: KvmArch, target: LocalApic, source: LocalApic | None,
                        shorthand: int, dest: int, dest_mode: int) -> bool:
    mda = kvm_apic_mda(kvm, dest, source, target)
    if shorthand == A.APIC_DEST_NOSHORT:
        if dest_mode == A.APIC_DEST_PHYSICAL:
            return kvm_apic_match_physical_addr(target, mda)
        return kvm_apic_match_logical_addr(target, mda)
    if shorthand == A.APIC_DEST_SELF:
        return target is source
    if shorthand == A.APIC_DEST_ALLINC:
        return True
    if shorthand == A.APIC_DEST_ALLBUT:
        return target is not source
    return False


def kvm_vector_to_index(vector: int, dest_vcpus: int, bitmap: int) -> int:
    """The (vector % dest_vcpus)-th set bit of *bitmap* (vector hashing)."""
    mod = vector % dest_vcpus
    for _ in range(mod):
        bitmap &= bitmap - 1
    return (bitmap & -bitmap).bit_length() - 1
