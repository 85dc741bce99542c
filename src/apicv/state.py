"""struct kvm_lapic_state: the 1024-byte KVM_GET_LAPIC / KVM_SET_LAPIC page, with named access,
decoding and diffing driven by the register table.

(``kvm_apic_state_fixup`` and the get/set sequences live with the LAPIC in :mod:`apicv.lapic`;
this module is the userspace view of the bytes.)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from . import apicdef as A
from .errors import StateError
from .regs import REGISTERS, Reg, decode_fields, lookup
from .uapi import KVM_APIC_REG_SIZE

BANKS = {"ISR": A.APIC_ISR, "TMR": A.APIC_TMR, "IRR": A.APIC_IRR}


def vectors_of(value: int) -> list[int]:
    out = []
    while value:
        low = value & -value
        out.append(low.bit_length() - 1)
        value ^= low
    return out


class LapicState:
    """A kvm_lapic_state page. Index it by register name or offset for the 32-bit value at that
    register's first dword; ``.irr``/``.isr``/``.tmr`` give the 256-bit vector sets."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        if data is None:
            data = bytes(KVM_APIC_REG_SIZE)
        if len(data) != KVM_APIC_REG_SIZE:
            raise StateError(f"a kvm_lapic_state is {KVM_APIC_REG_SIZE} bytes, not {len(data)}")
        self.data = bytearray(data)

    @classmethod
    def load(cls, path: str) -> LapicState:
        try:
            with open(path, "rb") as f:
                data = f.read(KVM_APIC_REG_SIZE + 1)
        except OSError as e:
            raise StateError(f"{path}: cannot read: {e.strerror}") from None
        if len(data) != KVM_APIC_REG_SIZE:
            raise StateError(f"{path}: {len(data)}{'+' if len(data) > KVM_APIC_REG_SIZE else ''}"
                             f" bytes; a KVM_GET_LAPIC state is exactly {KVM_APIC_REG_SIZE} bytes")
        return cls(data)

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.data)

    def __bytes__(self) -> bytes:
        return bytes(self.data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LapicState) and self.data == other.data

    def copy(self) -> LapicState:
        return LapicState(self.data)

    @staticmethod
    def _offset(key: str | int) -> int:
        return lookup(key).offset if isinstance(key, str) else key

    def __getitem__(self, key: str | int) -> int:
        return struct.unpack_from("<I", self.data, self._offset(key))[0]

    def __setitem__(self, key: str | int, value: int) -> None:
        struct.pack_into("<I", self.data, self._offset(key), value & 0xFFFFFFFF)

    def get_vectors(self, bank: str) -> int:
        base = BANKS[bank.upper()]
        v = 0
        for i in range(8):
            v |= self[base + 0x10 * i] << (32 * i)
        return v

    def set_vectors(self, bank: str, vectors: int | Iterable[int]) -> None:
        if not isinstance(vectors, int):
            bits = 0
            for vec in vectors:
                if not 0 <= vec <= 255:
                    raise ValueError(f"vector {vec} out of range")
                bits |= 1 << vec
            vectors = bits
        base = BANKS[bank.upper()]
        for i in range(8):
            self[base + 0x10 * i] = (vectors >> (32 * i)) & 0xFFFFFFFF

    irr = property(lambda s: s.get_vectors("IRR"), lambda s, v: s.set_vectors("IRR", v))
    isr = property(lambda s: s.get_vectors("ISR"), lambda s, v: s.set_vectors("ISR", v))
    tmr = property(lambda s: s.get_vectors("TMR"), lambda s, v: s.set_vectors("TMR", v))

    def reserved_bytes(self) -> list[tuple[int, int]]:
        """(offset, byte) for every nonzero byte outside a register's first dword (0x304 holds
        the x2APIC ICR high half on VMX)."""
        out = []
        for off in range(0, KVM_APIC_REG_SIZE, 0x10):
            for b in range(4, 16):
                if self.data[off + b]:
                    out.append((off + b, self.data[off + b]))
        return out

    def decode(self) -> list[DecodedReg]:
        rows = []
        for reg in REGISTERS:
            if reg.name in BANKS and reg.offset != BANKS[reg.name]:
                continue
            if reg.name in BANKS:
                vec = self.get_vectors(reg.name)
                rows.append(DecodedReg(reg, vec, [("vectors", _vec_text(vec))]))
            else:
                val = self[reg.offset]
                rows.append(DecodedReg(reg, val, decode_fields(reg, val)))
        return rows


@dataclass
class DecodedReg:
    reg: Reg
    value: int
    fields: list[tuple[str, str]]

    @property
    def is_bank(self) -> bool:
        return self.reg.name in BANKS

    def value_text(self) -> str:
        return f"{len(vectors_of(self.value))} set" if self.is_bank else f"{self.value:#010x}"

    def fields_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.fields)


def _vec_text(v: int) -> str:
    vs = vectors_of(v)
    return "[" + ", ".join(f"{x:#04x}" for x in vs) + "]" if vs else "[]"


@dataclass
class StateDiff:
    name: str
    a: str
    b: str
    detail: str


def diff(a: LapicState, b: LapicState) -> list[StateDiff]:
    """Register-level differences, with the fields that changed. The pages are compared as
    bytes first; only the registers (and reserved bytes) that differ are decoded."""
    if a.data == b.data:
        return []
    out: list[StateDiff] = []
    da, db = a.data, b.data
    for reg in REGISTERS:
        name = reg.name
        if name in BANKS:
            if reg.offset != BANKS[name]:
                continue
            va, vb = a.get_vectors(name), b.get_vectors(name)
            if va == vb:
                continue
            only_a = vectors_of(va & ~vb)
            only_b = vectors_of(vb & ~va)
            detail = []
            if only_a:
                detail.append("only in A: " + ", ".join(f"{x:#04x}" for x in only_a))
            if only_b:
                detail.append("only in B: " + ", ".join(f"{x:#04x}" for x in only_b))
            out.append(StateDiff(name, _vec_text(va), _vec_text(vb), "; ".join(detail)))
            continue
        off = reg.offset
        if da[off:off + 4] == db[off:off + 4]:
            continue
        va, vb = a[off], b[off]
        changed = [f"{fa[0]}: {fa[1]} -> {fb[1]}"
                   for fa, fb in zip(decode_fields(reg, va), decode_fields(reg, vb),
                                     strict=True) if fa != fb]
        out.append(StateDiff(reg.short, f"{va:#010x}", f"{vb:#010x}", ", ".join(changed)))
    for off in range(0, KVM_APIC_REG_SIZE, 0x10):
        if da[off + 4:off + 16] == db[off + 4:off + 16]:
            continue
        for i in range(off + 4, off + 16):
            if da[i] != db[i]:
                out.append(StateDiff(f"byte {i:#05x}", f"{da[i]:#04x}", f"{db[i]:#04x}",
                                     "outside the register dwords"))
    return out
