"""The TDX protected APIC (KVM_X86_TDX_VM): what KVM refuses, how interrupts reach a trust
domain (posted interrupts only), and how KVM decides a halted TD vCPU has an interrupt. Facts
cite vmx/tdx.c, vmx/main.c, x86.c, irq.c and lapic.c (guest_apic_protected)."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import msi, place
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apicv
from apicv import KvmError
from apicv.errors import MsrRejected
from apicv.kvm_host import ApicvInhibit
from apicv.state import LapicState
from apicv.uapi import KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE
from apicv.vmx.pi_desc import POSTED_INTR_VECTOR
from apicv.vmx.tdx import TdVirtualApic


def td(n: int = 1, enable: bool = True, **kw) -> apicv.Vm:
    vm = apicv.Vm(n, vm_type="tdx", irqchip="split", **kw)
    if enable:
        for c in vm.vcpus:
            c.wrmsr(0x80F, 0x1FF)  # SPIV: a TDVMCALL KVM emulates in its copy
            c.vmx.exit_counts.clear()
    return vm


# ------------------------------------------------------------------ creation rules
def test_in_kernel_ioapic_refused_for_protected_eois():
    """KVM_CREATE_IRQCHIP on a VM with protected EOIs (TDX): -ENOTTY -- KVM cannot see EOIs,
    so it cannot emulate level-triggered IOAPIC interrupts."""
    with pytest.raises(KvmError) as e:
        apicv.Vm(1, vm_type="tdx")
    assert e.value.errno == errno.ENOTTY and e.value.ioctl == "KVM_CREATE_IRQCHIP"


def test_tdx_needs_enable_apicv():
    """tdx_bringup(): "APICv is required for TDX" -- without enable_apicv there is no TDX VM
    type and KVM_CREATE_VM fails with -EINVAL."""
    with pytest.raises(KvmError) as e:
        apicv.Vm(1, vm_type="tdx", irqchip="split", enable_apicv=False, flexpriority=True)
    assert e.value.errno == errno.EINVAL and e.value.ioctl == "KVM_CREATE_VM"


def test_unknown_vm_type_rejected():
    """KVM_CREATE_VM with a type outside kvm_caps.supported_vm_types: -EINVAL."""
    with pytest.raises(KvmError) as e:
        apicv.Vm(1, vm_type=2)  # KVM_X86_SEV_VM
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        apicv.Vm(1, vm_type="sev")


def test_vcpu_init_x2apic_bsp_runnable_and_pid():
    """tdx_vcpu_create/KVM_TDX_INIT_VCPU: guest_apic_protected; x2APIC enabled with the BSP bit
    on the reset BSP only; every vCPU RUNNABLE (no INIT/SIPI bring-up); APICv active; the PI
    descriptor's NV is POSTED_INTR_VECTOR and SN is clear once the vCPU has been loaded."""
    vm = td(2, enable=False)
    c0, c1 = vm.vcpus
    assert c0.get_msr(0x1B) == 0xFEE00D00 and c1.get_msr(0x1B) == 0xFEE00C00
    assert [c.get_mp_state() for c in vm.vcpus] == [KVM_MP_STATE_RUNNABLE] * 2
    for c in vm.vcpus:
        assert c.apic.guest_apic_protected and c.apic.apicv_active and c.apic.x2apic
        assert c.vmx.pi_desc.nv == POSTED_INTR_VECTOR and not c.vmx.pi_desc.sn
        assert isinstance(c.vmx.apic, TdVirtualApic)
    assert c1.get_msr(0x802) == 1  # x2APIC ID from KVM's copy (emulated MSR)


def test_get_set_lapic_rejected():
    """kvm_vcpu_ioctl_get_lapic/set_lapic: -EINVAL if guest_apic_protected."""
    vm = td(1)
    cpu = vm.vcpus[0]
    for call in (cpu.get_lapic, lambda: cpu.set_lapic(bytes(1024))):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EINVAL


def test_apic_base_read_only_and_virtualized_msrs_not_emulated():
    """tdx_set_msr: IA32_APIC_BASE is read-only; tdx_has_emulated_msr: the x2APIC registers the
    CPU virtualizes (TPR, PPR, EOI, ISR, TMR, IRR) cannot be read or written through KVM."""
    vm = td(1)
    cpu = vm.vcpus[0]
    assert cpu.set_msr(0x1B, 0xFEE00900) is False
    assert cpu.get_msr(0x1B) == 0xFEE00D00
    assert cpu.set_msr(0x808, 0x20) is False
    for msr in (0x808, 0x80A, 0x810, 0x820):
        with pytest.raises(MsrRejected):
            cpu.get_msr(msr)
    assert cpu.get_msr(0x80F) == 0x1FF  # SPIV is KVM's to emulate
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x1B, 0xFEE00900)


def test_guest_debug_refused():
    """KVM_SET_GUEST_DEBUG on a vCPU with protected guest state: -EINVAL (so the BLOCKIRQ
    inhibit can never be set for a TD)."""
    vm = td(1)
    with pytest.raises(KvmError) as e:
        vm.vcpus[0].set_guest_debug(True, True)
    assert e.value.errno == errno.EINVAL


# ------------------------------------------------------------------ posted interrupts only
def test_msi_goes_to_pir_only_and_kvm_irr_stays_empty():
    """tdx_deliver_interrupt: __vmx_deliver_posted_interrupt only (no IRR fallback); KVM's IRR
    is bogus for a TD, kvm_apic_has_interrupt() is -1, and kvm_cpu_has_interrupt() answers
    through tdx_protected_apic_has_interrupt() (PID.ON)."""
    vm = td(1)
    cpu = vm.vcpus[0]
    assert vm.signal_msi(*msi(0, 0x41)) == 1
    pi = cpu.vmx.pi_desc
    assert pi.pir == 1 << 0x41 and pi.on
    assert cpu.apic.irr == 0 and cpu.apic.kvm_apic_has_interrupt() == -1
    assert cpu.kvm_cpu_has_interrupt()
    assert cpu.take_interrupts() == [0x41]
    # taken and EOI'd on the TD's own page: no exit at all
    assert dict(cpu.vmx.exit_counts) == {}
    assert cpu.vmx.apic.isr == 0 and cpu.vmx.apic.irr == 0
    assert not pi.on and pi.pir == 0


def test_level_triggered_eoi_never_exits():
    """The EOI-exit bitmap is protected (has_protected_eoi): even a level-triggered vector is
    EOI'd by the CPU with no EOI-induced exit, so KVM never broadcasts the EOI."""
    vm = td(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(0xFEE00000, 0, 0x8000 | 0x4000 | 0x52)  # level, assert
    assert cpu.take_interrupts() == [0x52]
    assert "EOI_INDUCED" not in cpu.vmx.exit_counts
    assert vm.eoi_broadcasts == []


def test_ipi_between_td_vcpus_is_emulated_icr_write_then_posted():
    """The ICR is not virtualized for a TD: the guest's WRMSR 0x830 is a #VE and TDVMCALL
    (exit reason TDCALL) that KVM emulates; the IPI then reaches the target through its PI
    descriptor."""
    vm = td(2)
    c0, c1 = vm.vcpus
    c0.wrmsr(0x830, (1 << 32) | 0x55)
    assert dict(c0.vmx.exit_counts) == {"TDCALL": 1}
    assert c1.vmx.pi_desc.pir == 1 << 0x55
    assert c1.take_interrupts() == [0x55]


def test_running_td_vcpu_gets_notification_without_exit():
    """A TD vCPU in guest mode: the posted-interrupt notification is processed by the CPU
    (PIR -> the TD's vIRR -> RVI) and the interrupt delivered with no VM exit."""
    vm = td(2)
    c0, c1 = vm.vcpus
    c1.enter_guest(interrupts=True)
    vm.signal_msi(*msi(1, 0x61))
    assert c1.taken == [0x61]
    assert dict(c1.vmx.exit_counts) == {}


def test_entry_with_pid_on_processes_pir():
    """tdx_vcpu_run(): with PID.ON KVM sends itself the notification vector before entering,
    so the CPU moves PIR into the TD's vIRR at entry (RVI set) even while IF=0."""
    vm = td(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(*msi(0, 0x70))
    cpu.read_cr8()  # any guest operation: an entry with interrupts disabled
    assert cpu.vmx.rvi == 0x70 and cpu.vmx.apic.irr == 1 << 0x70
    assert not cpu.vmx.pi_desc.on and cpu.vmx.pi_desc.pir == 0
    assert cpu.take_interrupts() == [0x70]


def test_tpr_and_ppr_live_in_the_td_page():
    """CR8 and x2APIC TPR/PPR reads are virtualized on the TD's page (TPR shadow, x2APIC
    virtualization): TPR masks delivery with no exit and KVM's copy never sees it."""
    vm = td(1)
    cpu = vm.vcpus[0]
    cpu.write_cr8(5)
    assert cpu.rdmsr(0x808) == 0x50 and cpu.rdmsr(0x80A) == 0x50
    vm.signal_msi(*msi(0, 0x45))
    assert cpu.take_interrupts() == []
    cpu.wrmsr(0x808, 0)
    assert cpu.take_interrupts() == [0x45]
    assert cpu.apic.r[0x80 >> 2] == 0  # KVM's TPR
    assert dict(cpu.vmx.exit_counts) == {}


# ------------------------------------------------------------------ HLT
def test_halted_td_woken_by_posted_interrupt():
    """TDVMCALL<HLT> with interrupts enabled: the vCPU blocks; a posted interrupt (PID.ON)
    makes tdx_protected_apic_has_interrupt() true and wakes it."""
    vm = td(2)
    c1 = vm.vcpus[1]
    c1.halt(interrupts=True)
    assert c1.location == "halted" and c1.mp_state == KVM_MP_STATE_HALTED
    assert c1.vmx.exit_counts["TDCALL"] == 1
    vm.signal_msi(*msi(1, 0x41))
    assert c1.location == "guest" and c1.mp_state == KVM_MP_STATE_RUNNABLE
    assert c1.taken == [0x41]


def test_halt_with_interrupts_blocked_not_woken_by_interrupt():
    """tdx_interrupt_allowed(): false after TDVMCALL<HLT> with the interrupts-blocked flag, so
    an interrupt does not wake the vCPU (kvm_vcpu_has_events); an NMI does."""
    vm = td(1)
    cpu = vm.vcpus[0]
    cpu.halt(interrupts=False)
    vm.signal_msi(*msi(0, 0x42))
    assert cpu.location == "halted" and not cpu.kvm_vcpu_has_events()
    assert cpu.vmx.pi_desc.on  # still pending in the descriptor
    cpu.nmi()
    assert cpu.take_interrupts() == [2, 0x42]


def test_sti_hlt_with_recognized_interrupt_wakes_via_vmxip():
    """tdx_protected_apic_has_interrupt(): with the PIR already processed (ON clear) but the
    interrupt recognized in RVI between STI and HLT, KVM reads vmxip from the TDX module and
    does not block. With interrupts blocked at HLT it does not look."""
    vm = td(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(*msi(0, 0x41))
    cpu.halt(interrupts=True)  # entry processes PIR into RVI; STI shadow covers HLT
    assert cpu.location == "guest" and cpu.taken == [0x41]
    cpu.take_interrupts()
    vm.signal_msi(*msi(0, 0x42))
    cpu.halt(interrupts=False)
    assert cpu.vmx.vmxip() and not cpu.vmx.pi_desc.on
    assert cpu.location == "halted" and not cpu.kvm_vcpu_has_events()


# ------------------------------------------------------------------ INIT/SIPI, NMI, inhibits
def test_init_and_sipi_always_blocked():
    """vt_apic_init_signal_blocked() is true for a TD: an INIT stays latched, a SIPI is
    dropped, mp_state does not change; KVM_RUN refuses INIT_RECEIVED while INIT is blocked."""
    vm = td(2)
    c1 = vm.vcpus[1]
    vm.signal_msi(*msi(1, 0, dm=5))
    vm.signal_msi(*msi(1, 0x10, dm=6))
    assert c1.get_mp_state() == KVM_MP_STATE_RUNNABLE
    assert c1.apic.pending_events == 1  # KVM_APIC_INIT latched, SIPI cleared
    assert not c1.kvm_vcpu_has_events()
    c1.set_mp_state(apicv.KVM_MP_STATE_INIT_RECEIVED)
    with pytest.raises(KvmError) as e:
        c1.run()
    assert e.value.errno == errno.EINVAL


def test_extra_nmis_collapse():
    """tdx_inject_nmi(): TD_VCPU_PEND_NMI holds one NMI; further pending NMIs are dropped, so
    two KVM_NMIs give the guest one NMI (a normal VM takes both)."""
    vm = td(1)
    cpu = vm.vcpus[0]
    cpu.nmi()
    cpu.nmi()
    assert cpu.take_interrupts() == [2]
    normal = apicv.Vm(1)
    normal.vcpus[0].nmi()
    normal.vcpus[0].nmi()
    assert normal.vcpus[0].take_interrupts() == [2, 2]


def test_inhibit_kills_the_td():
    """vt_refresh_apicv_exec_ctrl(): KVM_BUG_ON(!kvm_vcpu_apicv_active) for a TD vCPU. An
    inhibit that deactivates APICv bugs the VM at the next entry; the VM is dead and every
    later ioctl fails with -EIO."""
    vm = td(2)
    vm.set_or_clear_apicv_inhibit(ApicvInhibit.HYPERV, True)
    with pytest.raises(KvmError) as e:
        vm.vcpus[0].run()
    assert e.value.errno == errno.EIO
    with pytest.raises(KvmError) as e:
        vm.vcpus[1].get_mp_state()
    assert e.value.errno == errno.EIO


def test_timer_through_kvm_copy_then_posted():
    """The LAPIC timer is KVM's to emulate (LVTT/TMICT are TDVMCALLs); its expiry is delivered
    like any interrupt (kvm_apic_local_deliver -> tdx_deliver_interrupt): into the PI
    descriptor, then by the CPU."""
    vm = td(1)
    cpu = vm.vcpus[0]
    cpu.wrmsr(0x83E, 0xB)  # TDCR: divide by 1
    cpu.wrmsr(0x832, 0xEF)  # LVTT: one-shot, vector 0xef
    cpu.wrmsr(0x838, 1000)
    assert cpu.vmx.exit_counts["TDCALL"] == 3
    vm.clock.advance(1_000_000)
    # apic_timer_expired() from the timer callback: pending, injected when the vCPU runs
    assert cpu.apic.timer_pending and cpu.vmx.pi_desc.pir == 0
    assert cpu.take_interrupts() == [0xEF]
    assert cpu.apic.irr == 0  # it went through the descriptor, not KVM's IRR


def test_td_page_state_decodes():
    """The TD's page can be looked at (not through KVM): vIRR/vISR as a kvm_lapic_state."""
    vm = td(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(*msi(0, 0x41))
    cpu.take_interrupts(eoi=False)
    page = LapicState(cpu.vmx.apic.state())
    assert page.isr == 1 << 0x41 and page["PPR"] == 0x40


# ------------------------------------------------------------------ property: TD == APICv
_TD_CASES = int(os.environ.get("APICV_TD_EQUIV_CASES", "1500"))


@st.composite
def _td_cases(draw):
    nr = draw(st.integers(1, 3))
    ops = []
    for _ in range(draw(st.integers(1, 14))):
        c = draw(st.integers(0, nr - 1))
        k = draw(st.sampled_from(["msi", "msi", "ipi", "ipi", "take", "take", "tpr", "eoi",
                                  "where", "where", "read", "timer", "advance"]))
        vec = draw(st.integers(0x20, 0xFF))
        if k == "msi":
            ops.append(("msi", draw(st.integers(0, nr - 1)), vec, draw(st.booleans())))
        elif k == "ipi":
            ops.append(("ipi", c, draw(st.integers(0, nr - 1)), vec,
                        draw(st.sampled_from([0, 0, 1, 2, 3]))))
        elif k == "take":
            ops.append(("take", c, draw(st.one_of(st.none(), st.integers(1, 2))),
                        draw(st.sampled_from([True, True, False]))))
        elif k == "tpr":
            ops.append(("tpr", c, draw(st.sampled_from([0, 0x20, 0x5F, 0xF0])),
                        draw(st.booleans())))
        elif k == "eoi":
            ops.append(("eoi", c))
        elif k == "where":
            ops.append(("where", c, draw(st.sampled_from(["guest", "halt", "host"])),
                        draw(st.booleans())))
        elif k == "read":
            ops.append(("read", c, draw(st.sampled_from([0x808, 0x80A, 0x813, 0x817, 0x823,
                                                         0x827, 0x802]))))
        elif k == "timer":
            ops.append(("timer", c, vec, draw(st.sampled_from([1, 500, 5000]))))
        else:
            ops.append(("advance", draw(st.sampled_from([1000, 100_000]))))
    return nr, ops


def _td_run(kind: str, nr: int, ops) -> list:
    if kind == "td":
        vm = apicv.Vm(nr, vm_type="tdx", irqchip="split")
    else:
        vm = apicv.Vm(nr, irqchip="split")
        for cpu in vm.vcpus:
            cpu.set_mp_state(KVM_MP_STATE_RUNNABLE)
            cpu.wrmsr(0x1B, (cpu.get_msr(0x1B) & 0x100) | 0xFEE00C00)
    for cpu in vm.vcpus:
        cpu.wrmsr(0x80F, 0x1FF)
    log: list = []
    for op in ops:
        kind_ = op[0]
        try:
            if kind_ == "msi":
                _, dest, vec, level = op
                r = vm.signal_msi(0xFEE00000 | (dest << 12), 0,
                                  vec | (0xC000 if level else 0))
            elif kind_ == "ipi":
                _, src, dst, vec, sh = op
                vm.vcpus[src].wrmsr(0x830, (dst << 32) | 0x4000 | (sh << 18) | vec)
                r = None
            elif kind_ == "take":
                r = vm.vcpus[op[1]].take_interrupts(op[2], op[3])
            elif kind_ == "tpr":
                _, c, val, cr8 = op
                if cr8:
                    vm.vcpus[c].write_cr8(val >> 4)
                else:
                    vm.vcpus[c].wrmsr(0x808, val)
                r = None
            elif kind_ == "eoi":
                vm.vcpus[op[1]].wrmsr(0x80B, 0)
                r = None
            elif kind_ == "where":
                _, c, where, iflag = op
                r = place(vm.vcpus[c], where, iflag)
            elif kind_ == "read":
                r = vm.vcpus[op[1]].rdmsr(op[2])
            elif kind_ == "timer":
                _, c, vec, count = op
                vm.vcpus[c].wrmsr(0x832, vec)
                vm.vcpus[c].wrmsr(0x838, count)
                r = None
            else:
                vm.clock.advance(op[1])
                r = None
        except (apicv.GuestFault, apicv.KvmError, apicv.VcpuNotRunnable) as e:
            r = (type(e).__name__, getattr(e, "vector", None))
        log.append((op, r, [(c.location, list(c.taken)) for c in vm.vcpus]))
    for cpu in vm.vcpus:
        cpu.leave_guest()
        try:
            cpu.halt(True)  # STI; HLT: anything still pending wakes it and is taken
            log.append(("final", cpu.location, list(cpu.taken)))
        except apicv.VcpuNotRunnable:
            log.append(("final", "blocked in HLT", list(cpu.taken)))
    return log


@settings(max_examples=_TD_CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(_td_cases())
def test_td_guest_sees_what_an_apicv_guest_sees(case):
    """For random MSIs, x2APIC IPIs (all shorthands), TPR/CR8, EOIs, timers, register reads
    and vCPU locations, a TD's guest takes the same vectors in the same order, reads the same
    TPR/PPR/ISR/IRR, and rests in the same places as the guest of an ordinary VM with APICv:
    moving the virtual-APIC page into the TDX module and making posted interrupts the only way
    in changes nothing the guest can see -- nothing is lost, nothing delivered twice. (Edge
    and level MSIs alike: with protected EOIs and a split irqchip no EOI is ever seen by KVM.)
    The single exception is a halted vCPU and a TPR-masked interrupt: see
    _spurious_td_wakeup; the comparison ends there."""
    nr, ops = case
    a = _td_run("vmx", nr, ops)
    b = _td_run("td", nr, ops)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y and _spurious_td_wakeup(x, y):
            return  # the one guest-visible difference (see below); nothing to compare after
        assert x == y, f"step {i}: APICv VM {x}\nTD       {y}"


def _spurious_td_wakeup(x, y) -> bool:
    """The TD difference: KVM cannot see a TD's PPR, so a halted TD vCPU is woken by a posted
    interrupt its TPR masks (tdx_protected_apic_has_interrupt: PID.ON), while an ordinary
    vCPU stays halted (kvm_apic_has_interrupt checks PPR). Same vectors taken; the TD vCPU is
    back in guest mode instead of in HLT."""
    if x[0] == "final":
        return (x[1] == "blocked in HLT" and y[1] in ("guest", "halted") and x[2] == y[2]
                or x[1] == "halted" and y[1] == "guest" and x[2] == y[2])
    if x[0] != y[0]:
        return False
    same_taken = all(p[1] == q[1] for p, q in zip(x[2], y[2], strict=True))
    if x[1] != y[1]:
        # the ordinary vCPU could not run the operation (still in HLT), the woken TD vCPU did
        if x[1] != ("VcpuNotRunnable", None) or not same_taken:
            return False
        return not (isinstance(y[1], list) and y[1])  # it took nothing the other could not
    diffs = [(p, q) for p, q in zip(x[2], y[2], strict=True) if p != q]
    return bool(diffs) and all(p[0] == "halted" and q[0] == "guest" and p[1] == q[1]
                               for p, q in diffs)


def test_td_tracing_enabled_later_sees_the_td_page():
    """Tracing turned on after the TD exists still records what the CPU does on the TD's own
    page (the posted interrupt and the virtual-interrupt delivery that takes it), and
    tdx_deliver_interrupt traces kvm_apicv_accept_irq."""
    vm = td(1)
    cpu = vm.vcpus[0]
    tr = vm.enable_tracing()
    vm.signal_msi(*msi(0, 0x41))
    assert cpu.take_interrupts() == [0x41]
    kinds = [e[2] for e in tr.timeline]
    assert "pir" in kinds and "vid" in kinds
    assert any("kvm_apicv_accept_irq: apicid 0 vec 65" in line for line in tr.lines())
