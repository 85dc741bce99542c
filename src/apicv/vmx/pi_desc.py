"""The posted-interrupt descriptor (arch/x86/include/asm/posted_intr.h, struct pi_desc).

64 bytes, 64-byte aligned::

    bits 0-255    PIR        one bit per vector, set by a poster, harvested into vIRR
    bit  256      ON         outstanding notification (control bit 0)
    bit  257      SN         suppress notification (control bit 1)
    byte 34       NV         notification vector (POSTED_INTR_VECTOR 0xF2, or the wake-up
                             vector 0xF1 while the vCPU blocks)
    bytes 36-39   NDST       notification destination (the pCPU's APIC ID)
"""

from __future__ import annotations

import struct

POSTED_INTR_VECTOR = 0xF2
POSTED_INTR_WAKEUP_VECTOR = 0xF1
POSTED_INTR_NESTED_VECTOR = 0xF0

POSTED_INTR_ON = 0
POSTED_INTR_SN = 1


class PiDesc:
    """struct pi_desc. ``pir`` is a 256-bit int; ``on``/``sn`` the control bits."""

    __slots__ = ("pir", "on", "sn", "nv", "ndst")

    def __init__(self) -> None:
        self.pir = 0
        self.on = False
        self.sn = False
        self.nv = POSTED_INTR_VECTOR
        self.ndst = 0

    def pi_test_and_set_pir(self, vector: int) -> bool:
        """Set PIR[vector]; True if it was already set."""
        bit = 1 << vector
        was = bool(self.pir & bit)
        if not was:
            self.pir |= bit
        return was

    def pi_test_and_set_on(self) -> bool:
        was = self.on
        self.on = True
        return was

    def pi_test_on(self) -> bool:
        return self.on

    def pi_clear_on(self) -> None:
        self.on = False

    def pi_harvest_pir(self) -> int:
        """Atomically read and clear PIR (pi_harvest_pir in newer kernels)."""
        pir, self.pir = self.pir, 0
        return pir

    def pi_is_pir_empty(self) -> bool:
        return not self.pir

    def pi_has_pending_interrupt(self) -> bool:
        """ON, or SN with vectors in PIR (pi_has_pending_interrupt)."""
        return self.on or (self.sn and self.pir != 0)

    def to_bytes(self) -> bytes:
        """The 64-byte in-memory layout."""
        pir = self.pir.to_bytes(32, "little")
        control = int(self.on) | (int(self.sn) << 1)
        return pir + struct.pack("<HBBI", control, self.nv, 0, self.ndst) + bytes(24)

    def __repr__(self) -> str:
        vecs = [v for v in range(256) if self.pir >> v & 1]
        return (f"PiDesc(pir={[hex(v) for v in vecs]}, on={int(self.on)}, sn={int(self.sn)}, "
                f"nv={self.nv:#x}, ndst={self.ndst:#x})")
