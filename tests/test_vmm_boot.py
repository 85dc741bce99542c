"""``apicv boot`` end to end on /dev/kvm with tiny 32-bit guests made here (no compiler):
the multiboot entry contract, serial output, isa-debug-exit status, timeouts and stops, the
model's LAPIC answering guest MMIO exactly as KVM's in-kernel one does, and CLI errors."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from elf_images import elf_image as _elf

from apicv.kvm import kvm_available
from apicv.vmm import STATUS_TIMEOUT, BootError, Machine

_OK, _WHY = kvm_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"/dev/kvm cannot run guests here: {_WHY}")

ENTRY = 0x200000


def _kernel(tmp_path, code: bytes, name: str = "k.elf") -> str:
    p = tmp_path / name
    p.write_bytes(_elf(1, [(ENTRY, code, len(code))], entry=ENTRY))
    return str(p)


def _out_latch(value_reg: bytes = b"") -> bytes:
    return value_reg + b"\xE7\xE0"  # out 0xe0, eax


def _exit(code: int) -> bytes:
    return b"\xB8" + struct.pack("<I", code) + b"\xE7\xF4" + b"\xEB\xFE"  # mov eax; out 0xf4


def _boot(path: str, irqchip: str, **kw):
    latches: list[int] = []
    m = Machine(path, irqchip=irqchip, **{k: v for k, v in kw.items() if k != "timeout"})
    write = m.ports.write

    def spy(port, size, value):
        if port == 0xE0:
            latches.append(value)
        write(port, size, value)

    m.ports.write = spy
    try:
        return m.run(kw.get("timeout", 20)), latches
    finally:
        m.close()


@pytest.mark.parametrize("irqchip", ["model", "kernel"])
def test_multiboot_entry_serial_and_debug_exit(tmp_path, irqchip):
    """Multiboot 0.6.96 3.2: the kernel starts in 32-bit protected mode with EAX = 0x2BADB002
    and EBX = the MBI; COM1 output reaches the host; isa-debug-exit ends the VM with status
    (code << 1) | 1, as QEMU's does."""
    code = (b"\x3D\x02\xB0\xAD\x2B"  # cmp eax, 0x2badb002
            b"\x75\x13"  # jne bad
            b"\x89\xD8" + _out_latch()  # mov eax, ebx; out 0xe0, eax
            + b"\xBA\xF8\x03\x00\x00\xB0\x41\xEE"  # mov edx, 0x3f8; mov al, 'A'; out dx, al
            + _exit(5)[:7]  # mov eax, 5; out 0xf4, eax
            + _exit(7))  # bad:
    res, latches = _boot(_kernel(tmp_path, code), irqchip)
    assert (res.reason, res.exit_code, res.status) == ("debug-exit", 5, 11)
    assert res.output == b"A"
    assert latches == [0x9000]


def test_lapic_mmio_reads_match_kvm(tmp_path):
    """The guest's xAPIC MMIO loads (ID, LVR, TPR, SPIV, LVT0, LVT1, LVTT, TMICT, DFR, LDR) read
    the same values from the model as from KVM's in-kernel LAPIC after reset: the BSP's LINT0
    is ExtINT, LINT1 masked (kvm_lapic_reset), LVR is KVM's version word 0x14."""
    regs = [0x20, 0x30, 0x80, 0xF0, 0x350, 0x360, 0x320, 0x380, 0xE0, 0xD0]
    code = b"".join(b"\xA1" + struct.pack("<I", 0xFEE00000 + r) + _out_latch() for r in regs)
    path = _kernel(tmp_path, code + _exit(0))
    model, ml = _boot(path, "model")
    kernel, kl = _boot(path, "kernel")
    assert model.status == kernel.status == 1
    assert len(ml) == len(regs) and ml == kl
    assert ml[1] & 0xFF == 0x14 and ml[4] == 0x700 and ml[5] == 0x10000


def test_mmio_writes_reach_the_model(tmp_path):
    """xAPIC stores go through apic_mmio_write: TPR keeps bits 7:0, SPIV keeps bits 9:0 (no
    bit 12: LVR does not advertise directed EOI with an in-kernel IOAPIC), LDR keeps bits
    31:24 -- identical on both irqchips."""
    writes = [(0x80, 0x1234_56A7), (0xF0, 0xFFFF_FFFF), (0xD0, 0xFFFF_FFFF)]
    code = b""
    for off, val in writes:
        code += b"\xB8" + struct.pack("<I", val) + b"\xA3" + struct.pack("<I", 0xFEE00000 + off)
        code += b"\xA1" + struct.pack("<I", 0xFEE00000 + off) + _out_latch()
    path = _kernel(tmp_path, code + _exit(0))
    (_, ml), (_, kl) = _boot(path, "model"), _boot(path, "kernel")
    assert ml == kl == [0xA7, 0x3FF, 0xFF00_0000]


@pytest.mark.parametrize("irqchip", ["model", "kernel"])
def test_timeout_stops_every_vcpu(tmp_path, irqchip):
    """A guest that never exits is stopped at the timeout (status 124) -- including an AP
    that never got a SIPI (blocked in KVM_RUN with the kernel irqchip, waiting in the model's
    UNINITIALIZED state otherwise); each vCPU's RIP is reported."""
    res, _ = _boot(_kernel(tmp_path, b"\xEB\xFE"), irqchip, smp=2, timeout=0.5)
    assert (res.status, res.reason) == (STATUS_TIMEOUT, "timeout")
    assert res.rips[0] == ENTRY and set(res.rips) == {0, 1}
    assert res.elapsed < 5


def test_bad_options_are_refused():
    """Impossible machine options are refused before a VM is made (BootError)."""
    with pytest.raises(BootError, match="irqchip"):
        Machine("x", irqchip="split")
    with pytest.raises(BootError, match="vCPUs"):
        Machine("x", smp=0)
    with pytest.raises(BootError, match="trace"):
        Machine("x", irqchip="kernel", trace=True)


def test_cli_errors_are_one_line(tmp_path):
    """`apicv boot` on a missing file or a non-multiboot file: one readable line, status 2,
    no traceback."""
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + bytes(200))
    for target, msg in ((str(tmp_path / "missing"), "No such file"),
                        (str(bad), "no multiboot header")):
        r = subprocess.run([sys.executable, "-m", "apicv.cli", "boot", target],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and "Traceback" not in r.stderr


def test_cli_boot_status_and_env_module(tmp_path):
    """`apicv boot --env K=V` makes module 0 the kvm-unit-tests environment; the process exit
    status is the guest's debug-exit status."""
    # mov ebx, [ebx+24] (mods_addr); mov eax, [ebx] (mod_start); mov eax, [eax]; out 0xe0
    code = b"\x8B\x5B\x18\x8B\x03\x8B\x00" + _out_latch() + _exit(3)
    path = _kernel(tmp_path, code)
    r = subprocess.run([sys.executable, "-m", "apicv.cli", "boot", path, "--env", "AB=1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7, r.stderr
    assert "code 3" in r.stderr


def _mov(reg: str, imm: int) -> bytes:
    return bytes((0xB8 + "acdb".index(reg[1]),)) + struct.pack("<I", imm & 0xFFFFFFFF)


def _wrmsr(index: int, value: int) -> bytes:
    return _mov("ecx", index) + _mov("eax", value) + _mov("edx", value >> 32) + b"\x0F\x30"


def _rdmsr_out(index: int, both: bool = False) -> bytes:
    code = _mov("ecx", index) + b"\x0F\x32" + _out_latch()
    return code + (b"\x89\xD0" + _out_latch() if both else b"")  # mov eax, edx


def _cpuid_edx_out(leaf: int) -> bytes:
    return _mov("eax", leaf) + _mov("ecx", 0) + b"\x0F\xA2\x89\xD0" + _out_latch()


def _both(tmp_path, code: bytes, **kw):
    path = _kernel(tmp_path, code)
    (mr, ml), (kr, kl) = _boot(path, "model", **kw), _boot(path, "kernel", **kw)
    assert (mr.status, mr.reason) == (kr.status, kr.reason), (mr.message, kr.message)
    assert ml == kl
    return mr, ml


def test_x2apic_msrs_through_userspace_exits(tmp_path):
    """With the model as irqchip, IA32_APIC_BASE goes through the MSR filter and the x2APIC
    MSRs through KVM_MSR_EXIT_REASON_INVAL exits: enabling x2APIC (kvm_apic_set_base), then
    RDMSR of the x2APIC ID (0x802) and LVR (0x803) give what KVM's LAPIC gives."""
    code = (_wrmsr(0x1B, 0xFEE00D00) + _rdmsr_out(0x1B) + _rdmsr_out(0x802)
            + _rdmsr_out(0x803) + _exit(0))
    res, latches = _both(tmp_path, code)
    assert res.status == 1 and latches == [0xFEE00D00, 0, latches[2]]
    assert latches[2] & 0xFF == 0x14


def test_x2apic_msr_in_xapic_mode_is_gp(tmp_path):
    """kvm_x2apic_msr_read fails outside x2APIC mode: the guest gets #GP -- here with no IDT,
    a triple fault, on both irqchips."""
    res, latches = _both(tmp_path, _rdmsr_out(0x802) + _exit(0))
    assert res.reason == "shutdown" and latches == []


def test_cpuid_apic_bit_follows_apic_base(tmp_path):
    """kvm_update_cpuid_runtime: CPUID.1:EDX.APIC (bit 9) follows IA32_APIC_BASE.EN -- with
    the model as irqchip too, because the VMM keeps KVM's apic_base equal to the model's."""
    code = (_wrmsr(0x1B, 0xFEE00100) + _cpuid_edx_out(1)
            + _wrmsr(0x1B, 0xFEE00900) + _cpuid_edx_out(1) + _exit(0))
    res, (off, on) = _both(tmp_path, code)
    assert res.status == 1 and not off & (1 << 9) and on & (1 << 9)


def test_tsc_deadline_msr(tmp_path):
    """kvm_set_lapic_tscdeadline_msr ignores writes unless LVTT is in TSC-deadline mode; in
    that mode a deadline reads back until it fires; both irqchips agree."""
    far = 0x7FFF_FFFF_0000_0000
    code = (_wrmsr(0x6E0, far) + _rdmsr_out(0x6E0, both=True)
            + _mov("eax", 0x500EF) + b"\xA3" + struct.pack("<I", 0xFEE00320)  # masked, TSC-DL
            + _wrmsr(0x6E0, far) + _rdmsr_out(0x6E0, both=True) + _exit(0))
    res, latches = _both(tmp_path, code)
    assert res.status == 1 and latches == [0, 0, 0, far >> 32]


def test_timeout_names_a_stuck_hypercall(tmp_path):
    """At a timeout, a vCPU whose RIP is on VMCALL is reported as stuck in a hypercall (H5:
    this host's KVM never returns from KVM_HC_SEND_IPI); a vCPU elsewhere is not."""
    code = _mov("eax", 10) + _mov("ebx", 0) + _mov("ecx", 0) + _mov("edx", 0)
    at = ENTRY + len(code)
    code += b"\x0F\x01\xC1" + b"\xEB\xFE"  # vmcall; jmp $
    res, _ = _boot(_kernel(tmp_path, code), "model", timeout=1)
    assert res.reason == "timeout"
    if res.rips[0] == at:
        assert f"stuck in a hypercall at {at:#x}" in res.message
    else:
        assert res.rips[0] == at + 3 and "hypercall" not in res.message


def test_pv_features_needing_kvms_lapic_are_hidden(tmp_path):
    """With the model as irqchip, CPUID 0x40000001 EAX hides KVM's PV features that need its
    in-kernel LAPIC (PV EOI bit 6, PV unhalt 7, PV send-IPI 11, PV sched_yield 13, async-PF
    interrupts 14); the kernel irqchip shows KVM_GET_SUPPORTED_CPUID's value."""
    from apicv.kvm.sys import get_supported_cpuid
    from apicv.vmm.machine import KVM_PV_FEATURES_NEEDING_LAPIC

    code = _mov("eax", 0x40000001) + _mov("ecx", 0) + b"\x0F\xA2" + _out_latch() + _exit(0)
    path = _kernel(tmp_path, code)
    (_, (model,)), (_, (kernel,)) = _boot(path, "model"), _boot(path, "kernel")
    with open("/dev/kvm", "rb", buffering=0) as f:
        sup = next(e.eax for e in get_supported_cpuid(f.fileno()) if e.function == 0x40000001)
    assert kernel == sup and sup & KVM_PV_FEATURES_NEEDING_LAPIC
    assert model == sup & ~KVM_PV_FEATURES_NEEDING_LAPIC
