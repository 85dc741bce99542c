"""The real-KVM backend (apicv.kvm) against /dev/kvm: each test names the KVM fact it checks.

Skipped, with the reason, where /dev/kvm cannot be used.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

import apicv
from apicv import uapi as U
from apicv.api import VcpuAPI, VmAPI, VmConfig
from apicv.errors import GuestFault, KvmError, MmioExit, VcpuNotRunnable
from apicv.kvm import KvmVcpu, KvmVm, kvm_available
from apicv.kvm.sys import host_module_parameters

_OK, _WHY = kvm_available()
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not _OK, reason=f"the KVM backend cannot run here: {_WHY}"),
]

APICBASE = 0x1B
LVR, TPR, PPR, SPIV, DFR = 0x30, 0x80, 0xA0, 0xF0, 0xE0
ICR, ICR2, LVTT, LVT0, LVT1, TDCR = 0x300, 0x310, 0x320, 0x350, 0x360, 0x3E0
X2APIC_ID_MSR, X2APIC_ICR_MSR = 0x802, 0x830


def reg(page: bytes, offset: int) -> int:
    return struct.unpack_from("<I", page, offset)[0]


def vectors(page: bytes, base: int) -> list[int]:
    return [32 * i + b for i in range(8) for b in range(32) if reg(page, base + 16 * i) >> b & 1]


@pytest.fixture
def vm():
    with KvmVm(2) as v:
        yield v


def add_last_vcpu_to_apic_map(vm: KvmVm) -> None:
    """KVM builds the APIC map while a new vCPU is not yet online, so the last-created vCPU
    is missing from it until something recalculates the map; KVM_SET_LAPIC does (as a VMM
    does at reset)."""
    cpu = vm.vcpus[0]
    cpu.set_lapic(cpu.get_lapic())


def test_backend_dispatch():
    """apicv.Vm(backend='kvm') is the real backend."""
    with apicv.Vm(1, backend="kvm") as v:
        assert isinstance(v, KvmVm)
        assert v.backend == "kvm"
        assert isinstance(v.vcpus[0], KvmVcpu)
        assert v.trace is None and v.enable_tracing() is None and v.apicv_inhibits is None


def test_reset_values(vm):
    """kvm_lapic_reset: LVR 0x50014, SPIV 0xFF, DFR all ones, LVT0 ExtINT on the BSP
    (KVM_X86_QUIRK_LINT0_REENABLED), APICBASE 0xFEE00900 on the BSP and 0xFEE00800 on APs."""
    bsp, ap = vm.vcpus
    assert bsp.get_msr(APICBASE) == 0xFEE00900
    assert ap.get_msr(APICBASE) == 0xFEE00800
    for cpu in vm.vcpus:
        page = cpu.get_lapic()
        assert len(page) == 1024
        assert reg(page, 0x20) == cpu.vcpu_id << 24
        assert reg(page, LVR) == 0x50014
        assert reg(page, SPIV) == 0xFF
        assert reg(page, DFR) == 0xFFFFFFFF
        assert reg(page, TPR) == 0
        assert reg(page, LVTT) == 0x10000
        assert reg(page, LVT1) == 0x10000
    assert reg(bsp.get_lapic(), LVT0) == 0x700
    assert reg(ap.get_lapic(), LVT0) == 0x10000
    assert bsp.get_mp_state() == U.KVM_MP_STATE_RUNNABLE
    assert ap.get_mp_state() == U.KVM_MP_STATE_UNINITIALIZED


def test_guest_mmio_read_lvr(vm):
    """The in-kernel APIC emulates the xAPIC page at 0xFEE00000: the guest reads LVR 0x50014."""
    assert vm.vcpus[0].mmio_read(LVR) == 0x50014
    assert vm.vcpus[0].mmio_read(LVR + 2, 1) == 0x05


def test_mmio_argument_checks(vm):
    """The same argument checks as the model (ValueError, nothing runs)."""
    cpu = vm.vcpus[0]
    with pytest.raises(ValueError):
        cpu.mmio_read(0x30, 3)
    with pytest.raises(ValueError):
        cpu.mmio_read(0xFFE, 4)
    with pytest.raises(ValueError):
        cpu.mmio_write(0x80, 0x100, 1)


def test_spiv_enable_then_msi_taken(vm):
    """__apic_accept_irq drops fixed interrupts while SPIV bit 8 is clear (KVM_SIGNAL_MSI -> 0);
    after the guest sets it, the MSI is accepted (1) and injected once IF=1 ([0x41]), leaving
    IRR empty."""
    cpu = vm.vcpus[0]
    assert vm.signal_msi(0xFEE00000, 0, 0x41) == 0
    cpu.mmio_write(SPIV, 0x1FF)
    assert cpu.mmio_read(SPIV) == 0x1FF
    assert vm.signal_msi(0xFEE00000, 0, 0x41) == 1
    assert 0x41 in vectors(cpu.get_lapic(), 0x200)
    assert cpu.take_interrupts() == [0x41]
    assert vectors(cpu.get_lapic(), 0x200) == []
    assert cpu.take_interrupts() == []


def test_interrupt_priority_and_limit(vm):
    """KVM injects the highest pending vector first, one per entry; the window's limit stops
    the agent after that many, and limit=0 opens no window at all."""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    for v in (0x50, 0x70, 0x60):
        assert vm.signal_msi(0xFEE00000, 0, v) == 1
    assert cpu.take_interrupts(limit=0) == []
    assert cpu.take_interrupts(limit=1) == [0x70]
    assert cpu.take_interrupts() == [0x60, 0x50]


def test_nmi_taken_with_interrupts_off(vm):
    """KVM_NMI is injected at the next entry even with IF=0; run() reports it and the next
    take_interrupts() returns it first."""
    cpu = vm.vcpus[0]
    cpu.nmi()
    assert cpu.run() == [2]
    assert cpu.take_interrupts() == [2]
    assert cpu.take_interrupts() == []


def test_x2apic_switch_and_icr_reserved_bit_faults(vm):
    """A guest WRMSR to IA32_APIC_BASE with EXTD enters x2APIC mode (ID = vcpu_id); an x2APIC
    ICR write with reserved bit 13 set takes #GP; the xAPIC page then reads all ones
    (KVM_X86_QUIRK_LAPIC_MMIO_HOLE)."""
    cpu = vm.vcpus[0]
    cpu.wrmsr(APICBASE, 0xFEE00D00)
    assert cpu.get_msr(APICBASE) == 0xFEE00D00
    assert cpu.rdmsr(X2APIC_ID_MSR) == 0
    with pytest.raises(GuestFault) as e:
        cpu.wrmsr(X2APIC_ICR_MSR, 1 << 13 | 0x41)
    assert e.value.vector == 13
    assert cpu.mmio_read(LVR) == 0xFFFFFFFF
    # the agent EOIs by WRMSR in x2APIC mode
    cpu.wrmsr(0x80F, 0x1FF)
    assert vm.signal_msi(0xFEE00000, 0, 0x42) == 1
    assert cpu.take_interrupts() == [0x42]


def test_x2apic_msr_in_xapic_mode_faults(vm):
    """kvm_x2apic_msr_read: x2APIC MSRs (0x800-0x8FF) #GP while the APIC is in xAPIC mode."""
    with pytest.raises(GuestFault) as e:
        vm.vcpus[0].rdmsr(X2APIC_ID_MSR)
    assert e.value == GuestFault(13)
    assert vm.vcpus[0].rdmsr(APICBASE) == 0xFEE00900


def test_cr8_is_tpr(vm):
    """MOV to CR8 sets TPR = value << 4 and MOV from CR8 reads TPR[7:4]."""
    cpu = vm.vcpus[0]
    cpu.write_cr8(5)
    assert cpu.read_cr8() == 5
    assert cpu.mmio_read(TPR) == 0x50
    with pytest.raises(GuestFault):
        cpu.write_cr8(0x10)


def test_set_get_lapic_round_trip(vm):
    """KVM_SET_LAPIC stores the page and KVM_GET_LAPIC returns it (PPR is recomputed from
    TPR; TDCR is stored unmasked)."""
    cpu = vm.vcpus[0]
    page = bytearray(cpu.get_lapic())
    struct.pack_into("<I", page, SPIV, 0x1FF)
    struct.pack_into("<I", page, TPR, 0x30)
    struct.pack_into("<I", page, LVTT, 0x20021)
    struct.pack_into("<I", page, TDCR, 0xFF)
    struct.pack_into("<I", page, ICR2, 0x01000000)
    cpu.set_lapic(bytes(page))
    back = cpu.get_lapic()
    assert reg(back, PPR) == 0x30
    struct.pack_into("<I", page, PPR, 0x30)
    assert back == bytes(page)
    assert cpu.read_cr8() == 3
    with pytest.raises(ValueError):
        cpu.set_lapic(b"\0" * 100)


def test_last_created_vcpu_missing_from_apic_map():
    """KVM recalculates the APIC map in kvm_lapic_reset while the vCPU being created is not
    yet online: the last-created vCPU receives nothing by destination (an NMI MSI counts 0)
    until the map is recalculated (here by KVM_SET_LAPIC)."""
    with KvmVm(3) as v:
        nmi = 0x400 | 2  # MSI data: NMI delivery mode
        assert [v.signal_msi(0xFEE00000 | i << 12, 0, nmi) for i in range(3)] == [1, 1, 0]
        add_last_vcpu_to_apic_map(v)
        assert [v.signal_msi(0xFEE00000 | i << 12, 0, nmi) for i in range(3)] == [1, 1, 1]


def test_init_sipi_ap(vm):
    """An INIT IPI puts an AP in INIT_RECEIVED (accepted by KVM_GET_MP_STATE); a SIPI then
    makes it RUNNABLE in real mode at CS = vector << 8, base vector << 12, RIP 0; the agent is
    re-established and guest operations work on the AP."""
    bsp, ap = vm.vcpus
    add_last_vcpu_to_apic_map(vm)
    bsp.mmio_write(ICR2, 1 << 24)
    bsp.mmio_write(ICR, 0x4500)  # INIT, assert, physical
    assert ap.get_mp_state() == U.KVM_MP_STATE_INIT_RECEIVED
    with pytest.raises(VcpuNotRunnable):
        ap.run()
    bsp.mmio_write(ICR, 0x4600 | 0x12)  # SIPI, vector 0x12
    assert ap.get_mp_state() == U.KVM_MP_STATE_RUNNABLE
    assert ap.sipi == (0x1200, 0x12000, 0)
    assert ap.mmio_read(LVR) == 0x50014
    assert ap.rdmsr(APICBASE) == 0xFEE00800
    ap.mmio_write(SPIV, 0x1FF)
    assert vm.signal_msi(0xFEE01000, 0, 0x61) == 1
    assert ap.take_interrupts() == [0x61]


def test_bsp_init_resets_and_agent_recovers(vm):
    """An INIT to the BSP resets it (RUNNABLE, real mode, SPIV back to 0xFF); the next guest
    operation re-establishes the agent, and a TPR set in between survives KVM_SET_SREGS."""
    bsp = vm.vcpus[0]
    bsp.mmio_write(SPIV, 0x1FF)
    bsp.mmio_write(ICR2, 0)
    bsp.mmio_write(ICR, 0x4500)  # INIT to itself
    assert bsp.get_mp_state() == U.KVM_MP_STATE_RUNNABLE
    assert not bsp.get_kvm_sregs().cr0 & (1 << 31)
    page = bytearray(bsp.get_lapic())
    assert reg(page, SPIV) == 0xFF
    struct.pack_into("<I", page, TPR, 0x7B)
    bsp.set_lapic(bytes(page))
    assert bsp.mmio_read(LVR) == 0x50014
    assert reg(bsp.get_lapic(), TPR) == 0x7B
    assert bsp.sipi is None


def test_uninitialized_ap_is_not_runnable_quickly(vm):
    """KVM_RUN on an UNINITIALIZED AP with nothing pending blocks; the backend says so."""
    t = time.monotonic()
    with pytest.raises(VcpuNotRunnable) as e:
        vm.vcpus[1].mmio_read(LVR)
    assert e.value.mp_state == U.KVM_MP_STATE_UNINITIALIZED
    assert time.monotonic() - t < 2


def test_halted_vcpu_blocks_until_nmi(vm):
    """A HALTED vCPU (KVM_SET_MP_STATE) with IF=0 blocks in KVM_RUN; an NMI wakes it."""
    cpu = vm.vcpus[0]
    cpu.set_mp_state(U.KVM_MP_STATE_HALTED)
    t = time.monotonic()
    with pytest.raises(VcpuNotRunnable):
        cpu.run()
    assert time.monotonic() - t < 2
    cpu.nmi()
    assert cpu.run() == [2]
    assert cpu.get_mp_state() == U.KVM_MP_STATE_RUNNABLE


def test_apic_base_relocated_above_4g(vm):
    """A host-initiated APICBASE write may move the APIC page above 4 GiB (below MAXPHYADDR);
    guest MMIO follows it there, including the handlers' EOI."""
    cpu = vm.vcpus[0]
    assert cpu.set_msr(APICBASE, 0x1_2340_0000 | 0x900)
    assert cpu.mmio_read(LVR) == 0x50014
    cpu.mmio_write(SPIV, 0x1FF)
    assert vm.signal_msi(0xFEE00000, 0, 0x44) == 1
    assert cpu.take_interrupts() == [0x44]
    assert cpu.set_msr(APICBASE, 0xFEE00900)
    assert cpu.mmio_read(SPIV) == 0x1FF


def test_mmio_hole_quirk_disabled_exits():
    """Without KVM_X86_QUIRK_LAPIC_MMIO_HOLE, xAPIC MMIO to a hardware-disabled APIC exits to
    userspace (KVM_EXIT_MMIO)."""
    with KvmVm(1, disabled_quirks=U.KVM_X86_QUIRK_LAPIC_MMIO_HOLE) as v:
        cpu = v.vcpus[0]
        assert cpu.set_msr(APICBASE, 0xFEE00100)
        with pytest.raises(MmioExit) as e:
            cpu.mmio_read(LVR)
        assert (e.value.gpa, e.value.size, e.value.is_write) == (0xFEE00030, 4, False)
        assert cpu.rdmsr(APICBASE) == 0xFEE00100


def test_signal_msi_without_any_apic_is_eperm():
    """KVM_SIGNAL_MSI returns -1 (EPERM) when the slow path finds no destination at all."""
    with KvmVm(0) as v:
        with pytest.raises(KvmError) as e:
            v.signal_msi(0xFEE00000, 0, 0x41)
        assert e.value.errno == U.EPERM


def test_vm_ioctl_errors():
    """KVM_SET_BOOT_CPU_ID: EINVAL above the max vCPU ID, EBUSY once a vCPU exists;
    KVM_CREATE_VCPU of an existing ID: EEXIST; the chosen BSP gets APICBASE.BSP."""
    with KvmVm(0) as v:
        with pytest.raises(KvmError) as e:
            v.set_boot_cpu_id(1 << 32)
        assert e.value.errno == U.EINVAL
        v.set_boot_cpu_id(1)
        v.create_vcpu(0)
        v.create_vcpu(1)
        assert v.vcpu(1).get_msr(APICBASE) == 0xFEE00900
        assert v.vcpu(0).get_msr(APICBASE) == 0xFEE00800
        with pytest.raises(KvmError) as e:
            v.set_boot_cpu_id(0)
        assert e.value.errno == U.EBUSY
        with pytest.raises(KvmError) as e:
            v.create_vcpu(1)
        assert e.value.errno == U.EEXIST
        # in-kernel irqchip: every flag but ENABLE_SUPPRESS_EOI_BROADCAST (split irqchip only)
        assert v.check_extension(U.KVM_CAP_X2APIC_API) == 0xB


def test_options_the_host_cannot_honour():
    """Module parameters and the TSC rate are the host's: other values are refused, the
    host's own are accepted; a split irqchip is a VM without the in-kernel PIC/IOAPIC."""
    with KvmVm(1) as v:
        params = dict(v.host_parameters)
        khz = v.tsc_khz
    with KvmVm(1, tsc_khz=khz, **params):
        pass
    with pytest.raises(ValueError):
        KvmVm(1, tsc_khz=khz + 1000)
    with pytest.raises(ValueError):
        KvmVm(1, enable_apicv=not params["enable_apicv"])
    with pytest.raises(ValueError):
        KvmVm(1, min_timer_period_us=params["min_timer_period_us"] + 1)
    with KvmVm(1, irqchip="split") as v:
        assert v.config.irqchip == "split"
        with pytest.raises(KvmError):
            v.get_irqchip(2)


def test_maxphyaddr_bounds_apic_base():
    """kvm_apic_set_base rejects APICBASE bits above the guest's MAXPHYADDR (CPUID
    0x80000008), which the backend sets from ``maxphyaddr``."""
    with KvmVm(1, maxphyaddr=36) as v:
        cpu = v.vcpus[0]
        assert not cpu.set_msr(APICBASE, 1 << 36 | 0x900)
        assert cpu.set_msr(APICBASE, 1 << 35 | 0x900)


def test_close_releases_every_fd():
    """close() closes the VM, vCPU and /dev/kvm fds and unmaps kvm_run and guest memory."""
    before = len(os.listdir("/proc/self/fd"))
    v = KvmVm(3)
    v.vcpus[0].mmio_read(LVR)
    assert len(os.listdir("/proc/self/fd")) > before
    v.close()
    v.close()  # idempotent
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(ValueError):
        v.vcpus[0].get_lapic()
    with KvmVm(2):
        pass
    assert len(os.listdir("/proc/self/fd")) == before


# the VmConfig fields whose None means "this host's value" on the real backend
HOST_FIELDS = ("enable_apicv", "flexpriority", "vector_hashing", "min_timer_period_us",
               "lapic_timer_advance", "tsc_khz", "maxphyaddr", "smm", "supported_mce_cap")


def test_vm_and_vcpu_implement_the_declared_api(vm):
    """KvmVm and KvmVcpu are apicv.api.VmAPI and VcpuAPI (the runtime-checkable protocols)."""
    assert isinstance(vm, VmAPI)
    assert all(isinstance(cpu, VcpuAPI) for cpu in vm.vcpus)
    assert vm.backend == "kvm" and vm.trace is None


def test_vmconfig_and_keyword_options_are_the_same_vm():
    """KvmVm takes a VmConfig, or its fields as arguments; either way ``config`` is the
    resolved config: every None replaced by this host's value (module parameters from sysfs,
    KVM_GET_TSC_KHZ, CPUID 0x80000008, KVM_CAP_X86_SMM, KVM_X86_GET_MCE_CAP_SUPPORTED)."""
    cfg = VmConfig(nr_vcpus=2, x2apic_api=U.KVM_X2APIC_API_USE_32BIT_IDS, mcg_cap=0)
    with KvmVm(cfg) as a, KvmVm(2, U.KVM_X2APIC_API_USE_32BIT_IDS) as b:
        assert a.config == b.config
        assert [c.vcpu_id for c in a.vcpus] == [0, 1]
        r = a.config
        for name, value in host_module_parameters().items():
            assert getattr(r, name) == value, name
        assert (r.tsc_khz, r.maxphyaddr, r.smm, r.supported_mce_cap) == (
            a.tsc_khz, a.maxphyaddr, a.smm, a.supported_mce_cap)
        assert all(getattr(r, name) is not None for name in HOST_FIELDS)
        assert r.replace(**dict.fromkeys(HOST_FIELDS)) == cfg
        resolved = r
    with KvmVm(resolved) as c:  # the host's own values are accepted
        assert c.config == resolved
    with KvmVm(cfg, vcpu_ids=(3, 5)) as d:  # options replace the config's fields
        assert [c.vcpu_id for c in d.vcpus] == [3, 5]
        assert d.config.vcpu_ids == (3, 5) and d.config.x2apic_api == cfg.x2apic_api


def test_config_values_the_host_does_not_have():
    """smm and supported_mce_cap, like the module parameters, are the host's: another value
    is ValueError; an unknown option is TypeError; a malformed one ValueError (VmConfig)."""
    with KvmVm(0) as v:
        smm, mce = v.smm, v.supported_mce_cap
    with pytest.raises(ValueError, match="smm"):
        KvmVm(1, smm=not smm)
    with pytest.raises(ValueError, match="supported_mce_cap"):
        KvmVm(1, supported_mce_cap=mce ^ 1)
    with pytest.raises(TypeError, match="no_such_option"):
        KvmVm(1, no_such_option=1)
    with pytest.raises(ValueError):
        KvmVm(1, maxphyaddr=20)
    with KvmVm(0, trace=True) as v:  # accepted; there is no tracing on this backend
        assert v.trace is None and v.config.trace


def test_unknown_vcpu_id_is_value_error(vm):
    """vm.vcpu(id) for an id no vCPU has: ValueError naming the ids there are."""
    assert vm.vcpu(1) is vm.vcpus[1]
    with pytest.raises(ValueError, match=r"no vCPU with id 7 \(vCPU ids: 0, 1\)"):
        vm.vcpu(7)


def test_values_that_do_not_fit_the_uapi_raise_before_anything_changes(vm):
    """A u32 field of struct kvm_msi / kvm_irq_level / kvm_msr_entry.index, or the u64 MSR
    data, that the value does not fit: ValueError, and nothing is sent (no truncation)."""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    for args in ((1 << 32 | 0xFEE00000, 0, 0x41), (0xFEE00000, 1 << 32, 0x41),
                 (0xFEE00000, 0, 1 << 32 | 0x41), (0xFEE00000, 0, 0x41, -1),
                 (0xFEE00000, 0, 0x41, 0, 1 << 32), (-1, 0, 0x41)):
        with pytest.raises(ValueError):
            vm.signal_msi(*args)
    assert vectors(cpu.get_lapic(), 0x200) == []  # a truncated MSI would have set IRR 0x41
    for level in (1 << 32, -1):
        with pytest.raises(ValueError):
            vm.irq_line(0, level)
    base = cpu.get_msr(APICBASE)
    for index in (1 << 32 | APICBASE, -1):
        with pytest.raises(ValueError):
            cpu.get_msr(index)
        with pytest.raises(ValueError):
            cpu.set_msr(index, base)
    for value in (1 << 64, -1):
        with pytest.raises(ValueError):
            cpu.set_msr(APICBASE, value)
    assert cpu.get_msr(APICBASE) == base


def test_set_guest_debug_blockirq_holds_interrupts(vm):
    """KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_BLOCKIRQ: KVM injects no
    interrupt (it stays in IRR); clearing the control lets it in."""
    cpu = vm.vcpus[0]
    cpu.mmio_write(SPIV, 0x1FF)
    cpu.set_guest_debug(enable=True, blockirq=True)
    assert vm.signal_msi(0xFEE00000, 0, 0x41) == 1
    assert cpu.take_interrupts() == []
    assert vectors(cpu.get_lapic(), 0x200) == [0x41]
    cpu.set_guest_debug()
    assert cpu.take_interrupts() == [0x41]
    cpu.set_guest_debug(enable=True)  # ENABLE alone changes nothing the agent sees
    assert vm.signal_msi(0xFEE00000, 0, 0x42) == 1
    assert cpu.take_interrupts() == [0x42]
