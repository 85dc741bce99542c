"""Tracepoint text formats (arch/x86/kvm/trace.h, include/trace/events/kvm.h) and tracing being
off by default."""

from __future__ import annotations

from conftest import make_vm, to_x2apic

import apicv
from apicv import apicdef as A


def events(vm):
    return [(e.name, e.text) for e in vm.trace.events]


def test_tracing_off_by_default():
    vm = apicv.Vm(1)
    assert vm.trace is None and vm.vcpus[0].apic.trace is None and vm.router.trace is None


def test_kvm_apic_read_write_symbols():
    """kvm_apic: "apic_%s %s = 0x%llx" with __print_symbolic(reg); unknown offsets (e.g. the
    second IRR word, or an unaligned byte read) print as hex."""
    vm = make_vm(1)
    tr = vm.enable_tracing()
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TASKPRI, 0x20)
    cpu.mmio_read(A.APIC_IRR + 0x10)
    cpu.mmio_read(A.APIC_LVR + 2, size=1)
    assert events(vm)[:3] == [
        ("kvm_apic", "apic_write APIC_TASKPRI = 0x20"),
        ("kvm_apic", "apic_read 0x210 = 0x0"),
        ("kvm_apic", "apic_read 0x32 = 0x50014"),
    ]
    assert tr.events[0].line() == "vcpu-0 [000] 0.000000: kvm_apic: apic_write APIC_TASKPRI = 0x20"


def test_ipi_accept_eoi_inj_formats():
    vm = make_vm(2)
    vm.enable_tracing()
    vm.vcpus[0].mmio_write(A.APIC_ICR2, 1 << 24)
    vm.vcpus[0].mmio_write(A.APIC_ICR, 0xC942)  # lowest prio, logical, level assert
    vm.vcpus[0].mmio_write(A.APIC_ICR, 0x4042)
    vm.vcpus[1].take_interrupts()
    ev = events(vm)
    assert ("kvm_apic_ipi", "dst 1 vec 66 (LowPrio|logical|assert|level|dst)") in ev
    assert ("kvm_apic_ipi", "dst 1 vec 66 (Fixed|physical|assert|edge|dst)") in ev
    assert ("kvm_apic_accept_irq", "apicid 1 vec 66 (Fixed|edge)") in ev
    assert ("kvm_inj_virq", "IRQ 0x42") in ev
    assert ("kvm_eoi", "apicid 1 vector 66") in ev


def test_msi_trace_format_and_x2apic_icr_after_delivery():
    """kvm_msi_set_irq: "dst %llx vec %u (%s|%s|%s%s)"; an x2APIC ICR write is traced after
    the IPI was delivered (kvm_x2apic_icr_write)."""
    vm = make_vm(2, apicv.KVM_X2APIC_API_USE_32BIT_IDS)
    vm.enable_tracing()
    vm.signal_msi(0xFEE0100C, 0x100, 0x8141)
    assert events(vm)[0] == ("kvm_msi_set_irq", "dst 101 vec 65 (LowPrio|logical|level|rh)")
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    vm.trace.events.clear()
    cpu.wrmsr(0x830, (1 << 32) | 0x4043)
    assert [n for n, _ in events(vm)] == ["kvm_apic_ipi", "kvm_apic_accept_irq", "kvm_apic"]
    assert events(vm)[-1] == ("kvm_apic", "apic_write APIC_ICR = 0x100004043")


def test_eoi_with_empty_isr_traced_as_minus_one():
    """apic_set_eoi traces kvm_eoi even when no vector is in service (vector -1)."""
    vm = make_vm(1)
    vm.enable_tracing()
    vm.vcpus[0].mmio_write(A.APIC_EOI, 0)
    assert ("kvm_eoi", "apicid 0 vector -1") in events(vm)


def test_inhibit_trace_format():
    """kvm_apicv_inhibit_changed: "%s reason=%u, inhibits=0x%lx%s%s"."""
    vm = make_vm(2, enable_apicv=True)
    vm.enable_tracing()
    vm.vcpus[1].mmio_write(A.APIC_ID, 0)
    ev = [t for n, t in events(vm) if n == "kvm_apicv_inhibit_changed"]
    assert "set reason=4, inhibits=0x10 PHYSICAL_ID_ALIASED" in ev
    assert "set reason=5, inhibits=0x30 PHYSICAL_ID_ALIASED|APIC_ID_MODIFIED" in ev


def test_virtual_timestamps():
    vm = make_vm(1)
    tr = vm.enable_tracing()
    vm.clock.advance(1_234_567_000)
    vm.vcpus[0].mmio_read(A.APIC_LVR)
    assert tr.events[-1].line().startswith("vcpu-0 [000] 1.234567: kvm_apic:")
