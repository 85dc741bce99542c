"""An Intel MultiProcessor Specification 1.4 table: what tells a firmware-less Linux guest
(``acpi=off``, or a kernel built without ACPI) its CPUs, their APIC IDs, the IOAPIC and how
the ISA interrupts reach it.

The floating pointer and the configuration table go in the BIOS area at 0xF0000, one of the
places Linux's ``find_smp_config`` scans (and the e820 map marks reserved). The table has
one processor entry per vCPU (APIC ID = vCPU id, the first one the BSP), an ISA bus, the
IOAPIC at 0xFEC00000 with the next free ID, ISA IRQs 0-15 as a PC wires them (IRQ 0 on pin 2,
the others identity-mapped, the PIC's ExtINT on pin 0), and every LAPIC's LINT0 as ExtINT,
LINT1 as NMI.
"""

from __future__ import annotations

import struct

MPTABLE_GPA = 0xF0000
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
APIC_VERSION = 0x14  # the model's LVR low byte (KVM's APIC_VERSION)
IOAPIC_VERSION = 0x11

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
ISA_BUS = 0


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def isa_pin(irq: int) -> int:
    """The IOAPIC pin ISA IRQ *irq* is wired to in the table (IRQ 0 -> pin 2)."""
    return 2 if irq == 0 else irq


def build(nr_cpus: int, cpu_signature: int = 0x600, features: int = 0x201,
          base: int = MPTABLE_GPA) -> bytes:
    """The floating pointer (16 bytes at *base*) followed by the configuration table."""
    if not 1 <= nr_cpus <= 254:
        raise ValueError(f"{nr_cpus} CPUs do not fit an MP table with an IOAPIC")
    ioapic_id = nr_cpus
    entries = []
    for i in range(nr_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if i == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", MP_PROCESSOR, i, APIC_VERSION, flags,
                                   cpu_signature, features))
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS, b"ISA   "))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1,
                               IOAPIC_ADDR))
    # irqflag 0: polarity and trigger conform to the bus (ISA: active high, edge)
    entries.append(struct.pack("<BBHBBBB", MP_INTSRC, MP_EXTINT, 0, ISA_BUS, 0, ioapic_id, 0))
    for irq in range(16):
        if irq == 2:
            continue  # the cascade
        entries.append(struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, ISA_BUS, irq, ioapic_id,
                                   isa_pin(irq)))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, ISA_BUS, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, ISA_BUS, 0, 0xFF, 1))
    body = b"".join(entries)
    length = 44 + len(body)
    table_gpa = base + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, 4, 0,
                                   b"APICV   ", b"VMM         ", 0, 0, len(entries),
                                   LAPIC_ADDR, 0, 0, 0))
    table = bytearray(header + body)
    table[7] = _checksum(bytes(table))
    mpf = bytearray(struct.pack("<4sIBBB5B", b"_MP_", table_gpa, 1, 4, 0, 0, 0, 0, 0, 0))
    mpf[10] = _checksum(bytes(mpf))
    return bytes(mpf + table)
