"""The declarative register table: one row per local-APIC register.

Every fact about a register that KVM's lapic.c encodes in ``kvm_lapic_readable_reg_mask``,
``kvm_lapic_reg_write`` and ``kvm_lapic_reset`` is a column here, and the model reads it from
here only: readability per mode, who may write it in which mode, the write mask (and bits a write
forces on), the RESET value, the x2APIC MSR index, the tracepoint symbol and the field layout
used for decoding. :mod:`apicv.lapic` builds its read/write dispatch from this table, and the
table-driven tests walk it.

Readability (``read``):
  ``always`` readable in xAPIC and x2APIC mode; ``xapic`` only in xAPIC mode (ARBPRI, DFR, ICR2);
  ``cmci`` only when the APIC has 7 LVT entries; ``never`` (EOI, RRR, SELF_IPI).
Writability (``write``):
  ``both``; ``xapic`` (x2APIC: #GP, "ret 1"); ``x2apic`` (SELF_IPI; xAPIC MMIO: dropped);
  ``cmci`` (when 7 LVTs); ``never`` (read-only: MMIO writes are dropped, x2APIC WRMSR #GPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import apicdef as A


@dataclass(frozen=True, slots=True)
class Field:
    """A bit field inside a register, for decoding: bits [lo, hi] inclusive."""

    name: str
    lo: int
    hi: int
    values: dict[int, str] | None = None

    def extract(self, value: int) -> int:
        return (value >> self.lo) & ((1 << (self.hi - self.lo + 1)) - 1)


@dataclass(frozen=True, slots=True)
class Reg:
    offset: int
    name: str  # KVM's tracepoint symbol without the APIC_ prefix (trace.h kvm_trace_symbol_apic)
    short: str  # the name people use (TPR, PPR, ...)
    read: str  # always | xapic | cmci | never
    write: str  # both | xapic | x2apic | cmci | never
    mask: int  # bits a guest write keeps (SPIV gains bit 12 when LVR advertises directed EOI)
    reset: int  # value after kvm_lapic_reset(RESET); see reset_value() for the per-vCPU ones
    force: int = 0  # bits a guest write forces on (DFR: 0x0FFFFFFF)
    traced: bool = True  # has a symbol in kvm_trace_symbol_apic (only the first ISR/TMR/IRR does)
    lvt: int | None = None  # LVT index (enum lapic_lvt_entry) for LVT registers
    fields: tuple[Field, ...] = field(default=())
    doc: str = ""

    @property
    def msr(self) -> int:
        """x2APIC MSR index: APIC_BASE_MSR + (offset >> 4)."""
        return A.APIC_BASE_MSR + (self.offset >> 4)

    @property
    def trace_symbol(self) -> str:
        return f"APIC_{self.name}" if self.traced else f"{self.offset:#x}"


_DM = {0: "Fixed", 1: "LowPrio", 2: "SMI", 3: "RemRd", 4: "NMI", 5: "INIT", 6: "SIPI", 7: "ExtINT"}
_LVT_FIELDS = (
    Field("vector", 0, 7),
    Field("delivery_mode", 8, 10, _DM),
    Field("delivery_status", 12, 12),
    Field("polarity", 13, 13),
    Field("remote_irr", 14, 14),
    Field("trigger", 15, 15, {0: "edge", 1: "level"}),
    Field("masked", 16, 16),
)
_LVTT_FIELDS = (
    Field("vector", 0, 7),
    Field("delivery_status", 12, 12),
    Field("masked", 16, 16),
    Field("timer_mode", 17, 18, {0: "one-shot", 1: "periodic", 2: "tsc-deadline", 3: "reserved"}),
)
ICR_FIELDS = (
    Field("vector", 0, 7),
    Field("delivery_mode", 8, 10, _DM),
    Field("dest_mode", 11, 11, {0: "physical", 1: "logical"}),
    Field("busy", 12, 12),
    Field("level", 14, 14, {0: "de-assert", 1: "assert"}),
    Field("trigger", 15, 15, {0: "edge", 1: "level"}),
    Field("shorthand", 18, 19, {0: "none", 1: "self", 2: "all", 3: "all-but-self"}),
)

LVT_MASK = A.APIC_LVT_MASKED | A.APIC_SEND_PENDING | A.APIC_VECTOR_MASK  # 0x110FF
LINT_MASK = (
    LVT_MASK | A.APIC_MODE_MASK | A.APIC_INPUT_POLARITY | A.APIC_LVT_REMOTE_IRR
    | A.APIC_LVT_LEVEL_TRIGGER
)  # 0x1F7FF


def _bank(base: int, name: str, doc: str) -> list[Reg]:
    return [
        Reg(base + 0x10 * i, name, f"{name}{i}", "always", "never", 0, 0, traced=(i == 0),
            doc=f"{doc}, vectors {32 * i}-{32 * i + 31}")
        for i in range(A.APIC_ISR_NR)
    ]


REGISTERS: tuple[Reg, ...] = tuple(
    [
        Reg(A.APIC_ID, "ID", "ID", "always", "xapic", 0xFF000000, 0,
            fields=(Field("xapic_id", 24, 31),),
            doc="xAPIC: ID in bits 31:24, guest-writable; x2APIC: 32-bit read-only vcpu_id"),
        Reg(A.APIC_LVR, "LVR", "LVR", "always", "never", 0, 0x00050014,
            fields=(Field("version", 0, 7), Field("max_lvt", 16, 23),
                    Field("directed_eoi", 24, 24)),
            doc="0x14 | (nr_lvt-1)<<16 | bit 24 (directed EOI): x2APIC CPUID, no kernel IOAPIC"),
        Reg(A.APIC_TASKPRI, "TASKPRI", "TPR", "always", "both", 0xFF, 0,
            doc="task priority; bits 31:8 dropped on write"),
        Reg(A.APIC_ARBPRI, "ARBPRI", "APR", "xapic", "never", 0, 0, doc="always reads 0"),
        Reg(A.APIC_PROCPRI, "PROCPRI", "PPR", "always", "never", 0, 0,
            doc="processor priority, recomputed (apic_update_ppr) before every read"),
        Reg(A.APIC_EOI, "EOI", "EOI", "never", "both", 0, 0,
            doc="write-only; the value is ignored (no #GP for nonzero x2APIC writes)"),
        Reg(A.APIC_RRR, "RRR", "RRD", "never", "never", 0, 0, doc="remote read: not readable"),
        Reg(A.APIC_LDR, "LDR", "LDR", "always", "xapic", 0xFF000000, 0,
            fields=(Field("logical_id", 24, 31),),
            doc="xAPIC: bits 31:24 writable; x2APIC: read-only ((id>>4)<<16)|(1<<(id&0xf))"),
        Reg(A.APIC_DFR, "DFR", "DFR", "xapic", "xapic", 0xF0000000, 0xFFFFFFFF,
            force=0x0FFFFFFF, fields=(Field("model", 28, 31, {0xF: "flat", 0: "cluster"}),),
            doc="destination format; a write stores value | 0x0FFFFFFF"),
        Reg(A.APIC_SPIV, "SPIV", "SVR", "always", "both", 0x3FF, 0xFF,
            fields=(Field("vector", 0, 7), Field("apic_enabled", 8, 8),
                    Field("focus_disabled", 9, 9), Field("directed_eoi", 12, 12)),
            doc="bits 9:0 kept; bit 12 too when LVR advertises directed EOI"),
        *_bank(A.APIC_ISR, "ISR", "in-service"),
        *_bank(A.APIC_TMR, "TMR", "trigger mode"),
        *_bank(A.APIC_IRR, "IRR", "interrupt request"),
        Reg(A.APIC_ESR, "ESR", "ESR", "always", "both", 0, 0,
            doc="never written by KVM; a write stores nothing; x2APIC nonzero write #GPs"),
        Reg(A.APIC_LVTCMCI, "LVTCMCI", "LVTCMCI", "cmci", "cmci", LVT_MASK | A.APIC_MODE_MASK,
            A.APIC_LVT_MASKED, traced=False, lvt=A.LVT_CMCI, fields=_LVT_FIELDS,
            doc="present only with MCG_CMCI_P (7 LVTs)"),
        Reg(A.APIC_ICR, "ICR", "ICR", "always", "both", 0xFFFFFFFF & ~A.APIC_ICR_BUSY, 0,
            fields=ICR_FIELDS,
            doc="xAPIC: write sends the IPI with ICR2[31:24]; x2APIC: one 64-bit MSR"),
        Reg(A.APIC_ICR2, "ICR2", "ICR2", "xapic", "xapic", 0xFF000000, 0,
            fields=(Field("dest", 24, 31),), doc="xAPIC destination, bits 31:24 kept"),
        Reg(A.APIC_LVTT, "LVTT", "LVTT", "always", "both", LVT_MASK, A.APIC_LVT_MASKED,
            lvt=A.LVT_TIMER, fields=_LVTT_FIELDS,
            doc="mask 0x110FF | timer_mode_mask (bit 17; bits 18:17 with TSC-deadline CPUID)"),
        Reg(A.APIC_LVTTHMR, "LVTTHMR", "LVTTHMR", "always", "both", LVT_MASK | A.APIC_MODE_MASK,
            A.APIC_LVT_MASKED, lvt=A.LVT_THERMAL_MONITOR, fields=_LVT_FIELDS),
        Reg(A.APIC_LVTPC, "LVTPC", "LVTPC", "always", "both", LVT_MASK | A.APIC_MODE_MASK,
            A.APIC_LVT_MASKED, lvt=A.LVT_PERFORMANCE_COUNTER, fields=_LVT_FIELDS),
        Reg(A.APIC_LVT0, "LVT0", "LINT0", "always", "both", LINT_MASK, A.APIC_LVT_MASKED,
            lvt=A.LVT_LINT0, fields=_LVT_FIELDS,
            doc="RESET on the BSP: 0x700 (ExtINT, unmasked) with the LINT0_REENABLED quirk"),
        Reg(A.APIC_LVT1, "LVT1", "LINT1", "always", "both", LINT_MASK, A.APIC_LVT_MASKED,
            lvt=A.LVT_LINT1, fields=_LVT_FIELDS),
        Reg(A.APIC_LVTERR, "LVTERR", "LVTERR", "always", "both", LVT_MASK, A.APIC_LVT_MASKED,
            lvt=A.LVT_ERROR, fields=_LVT_FIELDS),
        Reg(A.APIC_TMICT, "TMICT", "TMICT", "always", "both", 0xFFFFFFFF, 0,
            doc="initial count; ignored in TSC-deadline mode"),
        Reg(A.APIC_TMCCT, "TMCCT", "TMCCT", "always", "never", 0, 0,
            doc="current count, computed from the timer; 0 in TSC-deadline mode"),
        Reg(A.APIC_TDCR, "TDCR", "TDCR", "always", "both", 0xB, 0,
            fields=(Field("divide", 0, 3, {0: "/2", 1: "/4", 2: "/8", 3: "/16", 8: "/32",
                                           9: "/64", 10: "/128", 11: "/1"}),),
            doc="divide configuration; bits 0, 1 and 3 kept"),
        Reg(A.APIC_SELF_IPI, "SELF_IPI", "SELF_IPI", "never", "x2apic", 0xFF, 0,
            doc="x2APIC only; bits 31:8 must be 0; sends a fixed edge self-IPI"),
    ]
)

BY_OFFSET: dict[int, Reg] = {r.offset: r for r in REGISTERS}
BY_NAME: dict[str, Reg] = {}
for _r in REGISTERS:
    BY_NAME.setdefault(_r.short.upper(), _r)
    BY_NAME.setdefault(_r.name.upper(), _r)

LVT_REGS: tuple[Reg, ...] = tuple(sorted((r for r in REGISTERS if r.lvt is not None),
                                         key=lambda r: r.lvt or 0))
# the APIC_LVTx(i) order used by kvm_lapic_reset and the SPIV-disable loop
LVT_OFFSETS: tuple[int, ...] = tuple(A.APIC_LVTx(i) for i in range(A.KVM_APIC_MAX_NR_LVT_ENTRIES))
LVT_WRITE_MASK: tuple[int, ...] = tuple(BY_OFFSET[o].mask for o in LVT_OFFSETS)

# the trace symbol of any 16-byte-aligned offset (unknown offsets print as hex)
TRACE_SYMBOL: dict[int, str] = {r.offset: r.trace_symbol for r in REGISTERS}
TRACE_SYMBOL.update({0x400: "APIC_EFEAT", 0x410: "APIC_ECTRL"})


def trace_symbol(offset: int) -> str:
    return TRACE_SYMBOL.get(offset, f"{offset:#x}")


def reg_mask(offsets) -> int:
    """KVM's APIC_REG_MASK: one bit per 16-byte register, bit = offset >> 4."""
    m = 0
    for o in offsets:
        m |= 1 << (o >> 4)
    return m


READABLE_ALWAYS = reg_mask(r.offset for r in REGISTERS if r.read == "always")
READABLE_XAPIC_ONLY = reg_mask(r.offset for r in REGISTERS if r.read == "xapic")
READABLE_CMCI = reg_mask(r.offset for r in REGISTERS if r.read == "cmci")


def readable_reg_mask(x2apic: bool, nr_lvt_entries: int) -> int:
    """kvm_lapic_readable_reg_mask(): the registers a read may touch in this configuration."""
    m = READABLE_ALWAYS
    if nr_lvt_entries > A.LVT_CMCI:
        m |= READABLE_CMCI
    if not x2apic:
        m |= READABLE_XAPIC_ONLY
    return m


def lookup(name_or_offset: str | int) -> Reg:
    """A register by offset (int, or '0x..' string), KVM symbol or common name ('TPR')."""
    if isinstance(name_or_offset, int):
        return BY_OFFSET[name_or_offset]
    key = name_or_offset.strip().upper()
    if key.startswith("APIC_"):
        key = key[5:]
    if key in BY_NAME:
        return BY_NAME[key]
    try:
        return BY_OFFSET[int(key, 0)]
    except ValueError:
        raise KeyError(name_or_offset) from None


def decode_fields(reg: Reg, value: int) -> list[tuple[str, str]]:
    """(field, text) pairs for a register value, using the table's field layout."""
    out = []
    for f in reg.fields:
        v = f.extract(value)
        text = f.values.get(v, str(v)) if f.values else (f"{v:#x}" if f.hi - f.lo >= 3 else str(v))
        out.append((f.name, text))
    return out
