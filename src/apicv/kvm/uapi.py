"""The KVM userspace ABI the real backend speaks: ioctl numbers and ctypes structures.

Every name is spelled as in include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h
(x86-64 layouts). ioctl numbers are computed with the _IO/_IOR/_IOW/_IOWR encoding of
include/uapi/asm-generic/ioctl.h, from the size of the ctypes structure they carry.

Why this module is long: it is a transcription of the UAPI headers' structures, one ctypes
class per C struct; splitting them would only scatter what the headers keep together.
"""

from __future__ import annotations

import ctypes

# the constants the model shares with this backend are defined once, in apicv.uapi
from ..uapi import (  # noqa: F401  (re-exported: K.KVM_CAP_*, K.KVM_APIC_REG_SIZE)
    KVM_APIC_REG_SIZE,
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_IRQCHIP,
    KVM_CAP_SET_BOOT_CPU_ID,
    KVM_CAP_SPLIT_IRQCHIP,
    KVM_CAP_X2APIC_API,
    KVM_CAP_X86_APIC_BUS_CYCLES_NS,
    KVM_CAP_X86_SMM,
    KVM_NR_INTERRUPTS,
    KVM_VCPU_EVENTS_SIZE,
    KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_PAYLOAD,
    KVM_VCPUEVENT_VALID_SHADOW,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    KVM_VCPUEVENT_VALID_SMM,
    KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
)

# ---------------------------------------------------------------- asm-generic/ioctl.h
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _size(t) -> int:
    return t if isinstance(t, int) else ctypes.sizeof(t)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, t) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(t))


def _IOW(type_: int, nr: int, t) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(t))


def _IOWR(type_: int, nr: int, t) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(t))


KVMIO = 0xAE
KVM_API_VERSION = 12

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32


class _Struct(ctypes.Structure):
    """A C struct that prints its fields (debugging aid)."""

    def __repr__(self) -> str:
        parts = []
        for name, *_ in self._fields_:
            v = getattr(self, name)
            parts.append(f"{name}={v:#x}" if isinstance(v, int) else f"{name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# ---------------------------------------------------------------- linux/kvm.h structures
class kvm_userspace_memory_region(_Struct):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_irq_level(_Struct):
    # union { __u32 irq; __s32 status; } -- status aliases irq
    _fields_ = [("irq", u32), ("level", u32)]

    @property
    def status(self) -> int:
        return ctypes.c_int32(self.irq).value


class kvm_pic_state(_Struct):
    _fields_ = [(n, u8) for n in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(_Struct):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),  # union { __u64 bits; struct fields; }
    ]


class _kvm_irqchip_u(ctypes.Union):
    _fields_ = [("dummy", ctypes.c_char * 512), ("pic", kvm_pic_state),
                ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(_Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _kvm_irqchip_u)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3


class kvm_irq_routing_irqchip(_Struct):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(_Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", u32 * 8)]


class kvm_irq_routing_entry(_Struct):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32),
                ("u", _kvm_irq_routing_entry_u)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2


class kvm_irq_routing(_Struct):
    _fields_ = [("nr", u32), ("flags", u32)]  # followed by entries[nr]


def kvm_irq_routing_with(n: int) -> type:
    """struct kvm_irq_routing with room for *n* entries."""

    class _R(_Struct):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * n)]

    return _R


class kvm_msi(_Struct):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


KVM_MSI_VALID_DEVID = 1 << 0


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_pit_config(_Struct):
    # KVM_CREATE_PIT2: flags (KVM_PIT_SPEAKER_DUMMY), the rest padding
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_channel_state(_Struct):
    _fields_ = [("count", u32), ("latched_count", u16)] + [(n, u8) for n in (
        "count_latched", "status_latched", "status", "read_state", "write_state",
        "write_latch", "rw_mode", "mode", "bcd", "gate")] + [("count_load_time", ctypes.c_int64)]


class kvm_pit_state2(_Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_reinject_control(_Struct):
    _fields_ = [("pit_reinject", u8), ("reserved", u8 * 31)]


assert ctypes.sizeof(kvm_pit_config) == 64
assert ctypes.sizeof(kvm_pit_channel_state) == 24
assert ctypes.sizeof(kvm_pit_state2) == 112
assert ctypes.sizeof(kvm_reinject_control) == 32


class kvm_enable_cap(_Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


class kvm_tpr_access_ctl(_Struct):
    _fields_ = [("enabled", u32), ("flags", u32), ("reserved", u32 * 8)]


class kvm_vapic_addr(_Struct):
    _fields_ = [("vapic_addr", u64)]


# ---------------------------------------------------------------- asm/kvm.h (x86)
class kvm_regs(_Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class kvm_segment(_Struct):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(_Struct):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
        ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
        ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]  # followed by entries[nmsrs]


class kvm_msrs_1(_Struct):
    """struct kvm_msrs with one entry (what the backend reads and writes)."""

    _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * 1)]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2


class kvm_cpuid2(_Struct):
    _fields_ = [("nent", u32), ("padding", u32)]  # followed by entries[nent]


def kvm_cpuid2_with(n: int) -> type:
    """struct kvm_cpuid2 with room for *n* entries."""

    class _C(_Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    return _C


class _kvm_vcpu_events_exception(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _kvm_vcpu_events_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _kvm_vcpu_events_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _kvm_vcpu_events_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _kvm_vcpu_events_triple_fault(_Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


assert ctypes.sizeof(kvm_vcpu_events) == KVM_VCPU_EVENTS_SIZE

KVM_RUN_X86_SMM = 1 << 0
KVM_RUN_X86_BUS_LOCK = 1 << 1


class kvm_guest_debug_arch(_Struct):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(_Struct):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


# struct kvm_guest_debug control (linux/kvm.h, asm/kvm.h)
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000  # arch/x86/include/uapi/asm/kvm.h: 1 << 20


# ---------------------------------------------------------------- struct kvm_run
class _kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class _kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _kvm_run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_tpr_access(_Struct):
    _fields_ = [("rip", u64), ("is_write", u32), ("pad", u32)]


class _kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_eoi(_Struct):
    _fields_ = [("vector", u8)]


class _kvm_run_msr(_Struct):
    """KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR (KVM_CAP_X86_USER_SPACE_MSR)."""

    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class _kvm_run_exit_union(ctypes.Union):
    _fields_ = [
        ("msr", _kvm_run_msr),
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("tpr_access", _kvm_run_tpr_access),
        ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event),
        ("eoi", _kvm_run_eoi),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(_Struct):
    """The header of the shared kvm_run page and its exit union (x86, not s390)."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _kvm_run_exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
    ]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_NOTIFY = 37
KVM_EXIT_MEMORY_FAULT = 39

EXIT_REASON_NAMES = {v: k for k, v in list(globals().items())
                     if k.startswith("KVM_EXIT_") and not k.startswith("KVM_EXIT_IO_")
                     and isinstance(v, int)}

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# ---------------------------------------------------------------- capabilities
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_VM_TSC_CONTROL = 214
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

# KVM_CAP_X86_USER_SPACE_MSR: which failed guest MSR accesses exit to userspace
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2


class kvm_translation(_Struct):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


class kvm_interrupt(_Struct):
    _fields_ = [("irq", u32)]


class kvm_msr_filter_range(_Struct):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", ctypes.c_void_p)]


KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1


class kvm_msr_filter(_Struct):
    _fields_ = [("flags", u32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]

# ---------------------------------------------------------------- ioctl numbers
# system (/dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, kvm_irq_level)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_X86_SET_MSR_FILTER = _IOW(KVMIO, 0xC6, kvm_msr_filter)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, kvm_irq_routing)
KVM_SET_BOOT_CPU_ID = _IO(KVMIO, 0x78)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_REINJECT_CONTROL = _IO(KVMIO, 0x71)  # takes a struct kvm_reinject_control pointer
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, kvm_interrupt)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_TPR_ACCESS_REPORTING = _IOWR(KVMIO, 0x92, kvm_tpr_access_ctl)
KVM_SET_VAPIC_ADDR = _IOW(KVMIO, 0x93, kvm_vapic_addr)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, kvm_guest_debug)
KVM_X86_SETUP_MCE = _IOW(KVMIO, 0x9C, u64)
KVM_X86_GET_MCE_CAP_SUPPORTED = _IOR(KVMIO, 0x9d, u64)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)

IOCTL_NAMES = {v: k for k, v in list(globals().items())
               if k.startswith("KVM_") and isinstance(v, int) and k.isupper()
               and (v >> _IOC_TYPESHIFT) & 0xFF == KVMIO}

# ---------------------------------------------------------------- x86 architecture bits
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
X86_EFLAGS_FIXED = 1 << 1
X86_EFLAGS_IF = 1 << 9


class kvm_clock_data(ctypes.Structure):
    """struct kvm_clock_data (48 bytes)."""

    _fields_ = [("clock", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("pad0", ctypes.c_uint32), ("realtime", ctypes.c_uint64),
                ("host_tsc", ctypes.c_uint64), ("pad", ctypes.c_uint32 * 4)]


KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
