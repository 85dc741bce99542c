"""KVM_INTERRUPT and KVM_GET/SET_VCPU_EVENTS, the same checks on the model and this host's KVM.

Expected values come from KVM's source (arch/x86/kvm/x86.c: kvm_vcpu_ioctl_interrupt,
kvm_vcpu_ioctl_x86_get_vcpu_events, kvm_vcpu_ioctl_x86_set_vcpu_events, process_nmi;
arch/x86/kvm/irq.c: kvm_cpu_has_extint / kvm_cpu_get_extint). The model is configured as this
host: no APICv, no SMM (KVM_CAP_X86_SMM = 0, CONFIG_KVM_SMM off). One host difference is named
where it is checked: the PVM backend keeps the interrupt-shadow byte as given
(pvm_set_interrupt_shadow stores ``mask``), where VMX keeps MOV-SS or STI blocking only
(vmx_set_interrupt_shadow / vmx_get_interrupt_shadow) -- the model does what VMX does.

The "kvm" half is skipped, with the reason, where /dev/kvm cannot be used.
"""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apicv
from apicv import uapi as U
from apicv.api import VcpuEvents
from apicv.errors import KvmError
from apicv.kvm import kvm_available
from apicv.kvm import uapi as K

KVM_OK, KVM_WHY = kvm_available()

NMI_PENDING = U.KVM_VCPUEVENT_VALID_NMI_PENDING
SIPI = U.KVM_VCPUEVENT_VALID_SIPI_VECTOR
SHADOW = U.KVM_VCPUEVENT_VALID_SHADOW
SMM = U.KVM_VCPUEVENT_VALID_SMM
GET_FLAGS = NMI_PENDING | SHADOW | SMM  # what KVM_GET_VCPU_EVENTS always reports
FRESH = VcpuEvents(flags=GET_FLAGS)
APIC_SPIV, APIC_ICR, APIC_LVT0 = 0xF0, 0x300, 0x350
SELF_FIXED = 1 << 18  # ICR destination shorthand "self", fixed delivery
MP_RUNNABLE, MP_INIT_RECEIVED = U.KVM_MP_STATE_RUNNABLE, U.KVM_MP_STATE_INIT_RECEIVED
EXAMPLES = {"model": 100, "kvm": 25}


def _smm() -> bool:
    if not KVM_OK:
        return False
    with apicv.Vm(0, backend="kvm") as probe:
        return bool(probe.smm)


HOST_SMM = _smm()
# the model as this host: KVM's software LAPIC (no APICv here) and its SMM support
MODEL_OPTIONS = {"enable_apicv": False, "flexpriority": False, "smm": HOST_SMM}


@pytest.fixture(params=["model", "kvm"])
def make_vm(request):
    """``make_vm(nr_vcpus=1, **options)`` on the backend under test; closed at teardown."""
    backend = request.param
    if backend == "kvm" and not KVM_OK:
        pytest.skip(f"/dev/kvm: {KVM_WHY}")
    made = []

    def make(nr_vcpus: int = 1, **options):
        opts = {**MODEL_OPTIONS, **options} if backend == "model" else options
        vm = apicv.Vm(nr_vcpus, backend=backend, **opts)
        made.append(vm)
        return vm

    make.backend = backend
    yield make
    for vm in made:
        vm.close()


def errno_of(fn, *args) -> int:
    with pytest.raises(KvmError) as ei:
        fn(*args)
    return ei.value.errno


# ---------------------------------------------------------------- the structure itself
def test_pack_is_struct_kvm_vcpu_events():
    """pack() gives the x86-64 layout of struct kvm_vcpu_events (asm/kvm.h), field by field."""
    ev = VcpuEvents(exception_injected=1, exception_nr=13, exception_has_error_code=1,
                    exception_pending=1, exception_error_code=0xDEADBEEF, interrupt_injected=1,
                    interrupt_nr=0x41, interrupt_soft=1, interrupt_shadow=2, nmi_injected=1,
                    nmi_pending=2, nmi_masked=1, sipi_vector=0x12345678, flags=0x3F,
                    smi_smm=1, smi_pending=1, smi_inside_nmi=1, smi_latched_init=1,
                    triple_fault_pending=1, exception_has_payload=1,
                    exception_payload=0xFEDCBA9876543210)
    raw = ev.pack()
    assert len(raw) == 64 == ctypes.sizeof(K.kvm_vcpu_events)
    c = K.kvm_vcpu_events.from_buffer_copy(raw)
    assert (c.exception.injected, c.exception.nr, c.exception.has_error_code,
            c.exception.pending, c.exception.error_code) == (1, 13, 1, 1, 0xDEADBEEF)
    assert (c.interrupt.injected, c.interrupt.nr, c.interrupt.soft, c.interrupt.shadow) == (
        1, 0x41, 1, 2)
    assert (c.nmi.injected, c.nmi.pending, c.nmi.masked, c.nmi.pad) == (1, 2, 1, 0)
    assert (c.sipi_vector, c.flags) == (0x12345678, 0x3F)
    assert (c.smi.smm, c.smi.pending, c.smi.smm_inside_nmi, c.smi.latched_init) == (1, 1, 1, 1)
    assert c.triple_fault.pending == 1 and bytes(c.reserved) == bytes(26)
    assert (c.exception_has_payload, c.exception_payload) == (1, 0xFEDCBA9876543210)
    assert VcpuEvents.unpack(raw) == ev


@pytest.mark.parametrize("field,value", [
    ("nmi_pending", 256), ("exception_nr", -1), ("exception_error_code", 1 << 32),
    ("sipi_vector", 1 << 32), ("flags", -1), ("exception_payload", 1 << 64),
    ("interrupt_nr", "0x30"),
])
def test_field_widths(field, value):
    """Each field has its C width (u8, u32, u64): anything else is ValueError."""
    with pytest.raises(ValueError, match=field):
        VcpuEvents(**{field: value})


def test_unpack_length():
    with pytest.raises(ValueError):
        VcpuEvents.unpack(bytes(63))


def test_set_takes_vcpu_events(make_vm):
    with pytest.raises(TypeError):
        make_vm().vcpus[0].set_vcpu_events(FRESH.pack())


# ---------------------------------------------------------------- KVM_INTERRUPT
def test_interrupt_enxio_with_in_kernel_pic(make_vm):
    """kvm_vcpu_ioctl_interrupt: with the in-kernel 8259 KVM_INTERRUPT is refused (ENXIO)."""
    cpu = make_vm().vcpus[0]
    assert errno_of(cpu.interrupt, 0x30) == U.ENXIO


@pytest.mark.parametrize("irqchip", ["kernel", "split"])
def test_interrupt_256_einval(make_vm, irqchip):
    """irq >= KVM_NR_INTERRUPTS is EINVAL, checked before anything else."""
    cpu = make_vm(irqchip=irqchip).vcpus[0]
    assert errno_of(cpu.interrupt, 256) == U.EINVAL
    assert errno_of(cpu.interrupt, 0xFFFFFFFF) == U.EINVAL


def test_interrupt_not_u32(make_vm):
    cpu = make_vm(irqchip="split").vcpus[0]
    for bad in (-1, 1 << 32, True):
        with pytest.raises(ValueError):
            cpu.interrupt(bad)


def test_split_interrupt_is_the_extint(make_vm):
    """Split irqchip: the vector is pending_external_vector, the ExtINT source of a vCPU that
    accepts PIC interrupts (the BSP's LVT0 is ExtINT after reset: LINT0_REENABLED); it is
    injected and recorded as interrupt.nr; while it is pending (LVT0 masked: not accepted) a
    second KVM_INTERRUPT is EEXIST."""
    cpu = make_vm(irqchip="split").vcpus[0]
    cpu.mmio_write(APIC_SPIV, 0x1FF)
    cpu.interrupt(0x30)
    assert cpu.take_interrupts() == [0x30]
    assert cpu.get_vcpu_events().interrupt_nr == 0x30
    cpu.mmio_write(APIC_LVT0, 0x10000)
    cpu.interrupt(0x31)
    assert cpu.take_interrupts() == []
    assert errno_of(cpu.interrupt, 0x32) == U.EEXIST


# ---------------------------------------------------------------- KVM_GET_VCPU_EVENTS
def test_fresh_vcpu(make_vm):
    """A new vCPU (BSP and AP): all zero, flags NMI_PENDING | SHADOW | SMM (SMM too on a host
    without SMM), sipi_vector never reported."""
    vm = make_vm(2)
    assert [c.get_vcpu_events() for c in vm.vcpus] == [FRESH, FRESH]


def test_nmi_counted_by_get(make_vm):
    """KVM_NMI only queues (nmi_queued); get runs process_nmi: pending 1, then at most 2."""
    cpu = make_vm().vcpus[0]
    cpu.nmi()
    assert cpu.get_vcpu_events().nmi_pending == 1
    cpu.nmi()
    cpu.nmi()
    assert cpu.get_vcpu_events().nmi_pending == 2


def test_set_nmi_state(make_vm):
    """set: nmi_pending = 0, nmi_queued = the count (KVM_REQ_NMI); get's process_nmi caps it at
    2, or 1 while NMIs are masked or one is injected."""
    cpu = make_vm().vcpus[0]
    cpu.set_vcpu_events(VcpuEvents(flags=NMI_PENDING, nmi_pending=5))
    assert cpu.get_vcpu_events() == FRESH.replace(nmi_pending=2)
    cpu.set_vcpu_events(VcpuEvents(flags=NMI_PENDING, nmi_pending=5, nmi_masked=1))
    assert cpu.get_vcpu_events() == FRESH.replace(nmi_pending=1, nmi_masked=1)
    cpu.set_vcpu_events(VcpuEvents(flags=NMI_PENDING, nmi_pending=3, nmi_injected=1))
    assert cpu.get_vcpu_events() == FRESH.replace(nmi_pending=1, nmi_injected=1)
    # without VALID_NMI_PENDING the pending count stays; the mask is always set
    cpu.set_vcpu_events(VcpuEvents(nmi_pending=0, nmi_masked=1))
    assert cpu.get_vcpu_events() == FRESH.replace(nmi_pending=1, nmi_masked=1)


def test_masked_nmi_waits_for_an_iret(make_vm):
    """A masked NMI stays pending until the guest executes IRET -- here at the end of a fixed
    interrupt's handler, after which the NMI is taken (SDM 6.7.1: any IRET unblocks NMIs)."""
    cpu = make_vm().vcpus[0]
    cpu.mmio_write(APIC_SPIV, 0x1FF)
    cpu.set_vcpu_events(VcpuEvents(nmi_masked=1))
    cpu.nmi()
    assert cpu.take_interrupts() == []
    assert cpu.get_vcpu_events() == FRESH.replace(nmi_pending=1, nmi_masked=1)
    cpu.mmio_write(APIC_ICR, SELF_FIXED | 0x46)
    assert cpu.take_interrupts() == [0x46, 2]
    assert cpu.get_vcpu_events() == FRESH.replace(interrupt_nr=0x46)


# ---------------------------------------------------------------- KVM_SET_VCPU_EVENTS
def test_injected_interrupt_round_trip_and_delivery(make_vm):
    """interrupt.injected/nr/soft are stored; get reports injected only if not soft, and the
    nr either way. An injected interrupt is re-injected at the next entry even with IF=0
    (inject_irq(reinjected)): the guest takes it during an operation that keeps IF clear."""
    cpu = make_vm().vcpus[0]
    cpu.set_vcpu_events(VcpuEvents(interrupt_injected=1, interrupt_nr=0x41, interrupt_soft=1))
    assert cpu.get_vcpu_events() == FRESH.replace(interrupt_nr=0x41)
    cpu.set_vcpu_events(VcpuEvents(interrupt_injected=1, interrupt_nr=0x52))
    assert cpu.get_vcpu_events() == FRESH.replace(interrupt_injected=1, interrupt_nr=0x52)
    cpu.mmio_write(APIC_SPIV, 0x1FF)
    assert cpu.take_interrupts() == [0x52]
    assert cpu.get_vcpu_events() == FRESH.replace(interrupt_nr=0x52)


def test_interrupt_nr_is_the_last_injected_vector(make_vm):
    """vcpu->arch.interrupt.nr is set by kvm_queue_interrupt at each injection and stays."""
    cpu = make_vm().vcpus[0]
    cpu.mmio_write(APIC_SPIV, 0x1FF)
    cpu.mmio_write(APIC_ICR, SELF_FIXED | 0x45)
    assert cpu.take_interrupts() == [0x45]
    assert cpu.get_vcpu_events() == FRESH.replace(interrupt_nr=0x45)


@pytest.mark.parametrize("shadow", [U.KVM_X86_SHADOW_INT_MOV_SS, U.KVM_X86_SHADOW_INT_STI])
def test_shadow(make_vm, shadow):
    """interrupt.shadow is set only with KVM_VCPUEVENT_VALID_SHADOW."""
    cpu = make_vm().vcpus[0]
    cpu.set_vcpu_events(VcpuEvents(interrupt_shadow=shadow))
    assert cpu.get_vcpu_events().interrupt_shadow == 0
    cpu.set_vcpu_events(VcpuEvents(flags=SHADOW, interrupt_shadow=shadow))
    assert cpu.get_vcpu_events().interrupt_shadow == shadow


@pytest.mark.parametrize("given_,vmx", [(3, 1), (0x80, 0), (0x82, 2)])
def test_shadow_other_bits(make_vm, given_, vmx):
    """VMX keeps MOV-SS blocking if bit 0 is set, else STI blocking if bit 1 is
    (vmx_set_interrupt_shadow); the model does so. Host difference: PVM's
    pvm_set_interrupt_shadow keeps the byte as given, so this host reports *given_* back."""
    vm = make_vm()
    cpu = vm.vcpus[0]
    cpu.set_vcpu_events(VcpuEvents(flags=SHADOW, interrupt_shadow=given_))
    expect = given_ if vm.backend == "kvm" else vmx
    assert cpu.get_vcpu_events().interrupt_shadow == expect


def test_sipi_vector_needs_its_flag(make_vm):
    """sipi_vector is never reported; with KVM_VCPUEVENT_VALID_SIPI_VECTOR it becomes the
    LAPIC's sipi_vector, which KVM_SET_MP_STATE(SIPI_RECEIVED) then delivers (CS = v << 8,
    base v << 12); without the flag it is ignored."""
    vm = make_vm(3)
    with_flag, without = vm.vcpus[1], vm.vcpus[2]
    with_flag.set_vcpu_events(VcpuEvents(flags=SIPI, sipi_vector=0x12))
    without.set_vcpu_events(VcpuEvents(sipi_vector=0x34))
    for cpu in (with_flag, without):
        assert cpu.get_vcpu_events() == FRESH
        cpu.set_mp_state(U.KVM_MP_STATE_SIPI_RECEIVED)
        assert cpu.get_mp_state() == MP_RUNNABLE
    assert with_flag.sipi == (0x1200, 0x12000, 0)
    assert without.sipi == (0, 0, 0)


@pytest.mark.parametrize("flags", [0x40, 0x80, 1 << 31, GET_FLAGS | 0x100])
def test_unknown_flags_einval(make_vm, flags):
    cpu = make_vm().vcpus[0]
    assert errno_of(cpu.set_vcpu_events, VcpuEvents(flags=flags, nmi_masked=1)) == U.EINVAL
    assert cpu.get_vcpu_events() == FRESH  # refused first: nothing changed


def test_payload_and_triple_fault_need_their_caps(make_vm):
    """KVM_VCPUEVENT_VALID_PAYLOAD without KVM_CAP_EXCEPTION_PAYLOAD is EINVAL before anything
    changes; VALID_TRIPLE_FAULT without KVM_CAP_X86_TRIPLE_FAULT_EVENT is EINVAL last, after
    the rest was applied."""
    cpu = make_vm().vcpus[0]
    bad = VcpuEvents(flags=U.KVM_VCPUEVENT_VALID_PAYLOAD, nmi_masked=1)
    assert errno_of(cpu.set_vcpu_events, bad) == U.EINVAL
    assert cpu.get_vcpu_events() == FRESH
    late = VcpuEvents(flags=U.KVM_VCPUEVENT_VALID_TRIPLE_FAULT, nmi_masked=1)
    assert errno_of(cpu.set_vcpu_events, late) == U.EINVAL
    assert cpu.get_vcpu_events() == FRESH.replace(nmi_masked=1)


@pytest.mark.parametrize("field", ["smi_smm", "smi_pending", "smi_inside_nmi"])
def test_smm_fields_without_smm_einval(make_vm, field):
    """Without CONFIG_KVM_SMM (this host; the model with smm=False), VALID_SMM with smm,
    pending or smm_inside_nmi set is EINVAL -- after the NMI mask etc. were set. Without the
    flag the SMM fields are ignored."""
    if HOST_SMM:
        pytest.skip("this host has SMM")
    cpu = make_vm().vcpus[0]
    assert errno_of(cpu.set_vcpu_events,
                    VcpuEvents(flags=SMM, nmi_masked=1, **{field: 1})) == U.EINVAL
    assert cpu.get_vcpu_events() == FRESH.replace(nmi_masked=1)
    cpu.set_vcpu_events(VcpuEvents(**{field: 1}))
    assert cpu.get_vcpu_events() == FRESH


def test_latched_init(make_vm):
    """smi.latched_init (with VALID_SMM) sets or clears KVM_APIC_INIT in pending_events;
    KVM_GET_MP_STATE then accepts it: an AP goes to INIT_RECEIVED, the BSP is reset and stays
    RUNNABLE -- the reset clears the injected exception, NMI state and shadow but keeps the
    exception vector/error code/payload and interrupt.nr (kvm_clear_*_queue)."""
    vm = make_vm(2)
    bsp, ap = vm.vcpus
    ap.set_vcpu_events(VcpuEvents(flags=SMM, smi_latched_init=1))
    assert ap.get_vcpu_events() == FRESH.replace(smi_latched_init=1)
    ap.set_vcpu_events(VcpuEvents(flags=SMM, smi_latched_init=0))
    assert ap.get_vcpu_events() == FRESH
    ap.set_vcpu_events(VcpuEvents(flags=SMM, smi_latched_init=1))
    assert ap.get_mp_state() == MP_INIT_RECEIVED
    assert ap.get_vcpu_events() == FRESH
    before = VcpuEvents(flags=SMM | SHADOW, smi_latched_init=1, exception_injected=1,
                        exception_nr=13, exception_has_error_code=1, exception_error_code=3,
                        exception_payload=5, interrupt_nr=0x77, interrupt_shadow=2,
                        nmi_masked=1, nmi_injected=1)
    bsp.set_vcpu_events(before)
    assert bsp.get_vcpu_events() == before.replace(flags=GET_FLAGS)
    assert bsp.get_mp_state() == MP_RUNNABLE
    assert bsp.get_vcpu_events() == FRESH.replace(
        exception_nr=13, exception_has_error_code=1, exception_error_code=3,
        exception_payload=5, interrupt_nr=0x77)


@pytest.mark.parametrize("nr", [2, 32, 0xFF])
def test_exception_vector_einval(make_vm, nr):
    """An injected exception must be a vector 0-31 other than NMI (2): EINVAL first."""
    cpu = make_vm().vcpus[0]
    assert errno_of(cpu.set_vcpu_events,
                    VcpuEvents(exception_injected=1, exception_nr=nr, nmi_masked=1)) == U.EINVAL
    assert cpu.get_vcpu_events() == FRESH


def test_exception_fields_kept(make_vm):
    """Without VALID_PAYLOAD exception.pending and exception_has_payload are taken as 0 (so a
    'pending' vector 40 is accepted), the payload itself is kept; any vector is stored when
    not injected; #BP and #OF (soft) are reported as not injected."""
    cpu = make_vm().vcpus[0]
    cpu.set_vcpu_events(VcpuEvents(exception_pending=1, exception_nr=40, exception_has_payload=1,
                                   exception_payload=0x1234, exception_error_code=7))
    assert cpu.get_vcpu_events() == FRESH.replace(exception_nr=40, exception_payload=0x1234,
                                                  exception_error_code=7)
    cpu.set_vcpu_events(VcpuEvents(exception_injected=1, exception_nr=3))
    assert cpu.get_vcpu_events() == FRESH.replace(exception_nr=3)
    ev = VcpuEvents(exception_injected=1, exception_nr=13, exception_has_error_code=1,
                    exception_error_code=0)
    cpu.set_vcpu_events(ev)
    assert cpu.get_vcpu_events() == ev.replace(flags=GET_FLAGS)


# ---------------------------------------------------------------- the round-trip property
@st.composite
def settable_events(draw) -> VcpuEvents:
    """Events KVM_SET_VCPU_EVENTS accepts on a host without SMM or the payload and
    triple-fault capabilities (shadow 0-2: the values VMX and PVM keep alike)."""
    flags = draw(st.sets(st.sampled_from([NMI_PENDING, SIPI, SHADOW, SMM])))
    injected = draw(st.booleans())
    vectors = [v for v in range(32) if v != 2] if injected else list(range(256))
    u8 = st.integers(0, 255)
    return VcpuEvents(
        exception_injected=int(injected), exception_nr=draw(st.sampled_from(vectors)),
        exception_has_error_code=draw(st.integers(0, 1)),
        exception_error_code=draw(st.integers(0, 0xFFFFFFFF)),
        exception_payload=draw(st.integers(0, (1 << 64) - 1)),
        interrupt_injected=draw(st.integers(0, 1)), interrupt_nr=draw(u8),
        interrupt_soft=draw(st.integers(0, 1)), interrupt_shadow=draw(st.integers(0, 2)),
        nmi_injected=draw(st.integers(0, 1)), nmi_pending=draw(u8),
        nmi_masked=draw(st.integers(0, 1)), sipi_vector=draw(st.integers(0, 0xFFFFFFFF)),
        flags=sum(flags), smi_latched_init=draw(st.integers(0, 1)))


def kept(ev: VcpuEvents) -> VcpuEvents:
    """What KVM_GET_VCPU_EVENTS reports right after *ev* was set on a fresh vCPU."""
    soft_exc = ev.exception_nr in (3, 4)
    nmi_limit = 1 if ev.nmi_masked or ev.nmi_injected else 2
    return dataclasses.replace(
        FRESH,
        exception_injected=0 if soft_exc else ev.exception_injected,
        exception_nr=ev.exception_nr, exception_has_error_code=ev.exception_has_error_code,
        exception_error_code=ev.exception_error_code, exception_payload=ev.exception_payload,
        interrupt_injected=int(ev.interrupt_injected and not ev.interrupt_soft),
        interrupt_nr=ev.interrupt_nr,
        interrupt_shadow=ev.interrupt_shadow if ev.flags & SHADOW else 0,
        nmi_injected=ev.nmi_injected, nmi_masked=ev.nmi_masked,
        nmi_pending=min(ev.nmi_pending, nmi_limit) if ev.flags & NMI_PENDING else 0,
        smi_latched_init=ev.smi_latched_init if ev.flags & SMM else 0)


@pytest.mark.parametrize("backend", ["model", "kvm"])
def test_set_then_get_keeps_what_kvm_keeps(backend):
    """Any VcpuEvents that KVM_SET_VCPU_EVENTS accepts comes back from KVM_GET_VCPU_EVENTS as
    ``kept`` says (booleans normalized, sipi_vector not reported, NMI count capped, soft
    events not reported as injected), on an AP (the BSP and AP keep the same)."""
    if backend == "kvm" and not KVM_OK:
        pytest.skip(f"/dev/kvm: {KVM_WHY}")
    if HOST_SMM:
        pytest.skip("the strategy is for a host without SMM")
    opts = MODEL_OPTIONS if backend == "model" else {}

    @settings(max_examples=EXAMPLES[backend], deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(settable_events())
    def check(ev):
        with apicv.Vm(2, backend=backend, **opts) as vm:
            cpu = vm.vcpus[1]
            cpu.set_vcpu_events(ev)
            assert cpu.get_vcpu_events() == kept(ev)

    check()
