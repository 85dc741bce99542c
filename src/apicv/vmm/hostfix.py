"""What this host's KVM leaves to the VMM when it runs an unmodified Linux guest (host-kvm-notes
items 11-12; README "Booting Linux", L1-L5). The guest kernel runs in KVM's instruction
emulator here (tracefs shows ``kvm_emulate_insn`` for its ordinary instructions), so what the
emulator does not know ends in KVM_EXIT_INTERNAL_ERROR (suberror 1, the instruction bytes in
the exit's data):

* L1/L2, XSAVE/XRSTOR, POPCNT, CLAC, CMPXCHG16B: avoided with the kernel's own switches
  (``noxsave clearcpuid=...``, :data:`apicv.vmm.linuxboot.HOST_APPEND`);
* L3, ``int3`` (the alternatives self-test, text patching): the #BP is delivered;
* L4, ``fwait``: completed;
* L5, SYSCALL from user mode stays at CPL 3 and faults at LSTAR: an int3 the VMM puts on the
  ``cld`` of the guest's #PF handler makes every guest #PF visible (that int3 is an internal
  error too), and the faults at LSTAR become the SYSCALL they should have been.

None of it is interrupt-related; each fix-up is counted by kind in the run's exits
(``apicv boot --stats``). An internal error none of these explains ends the run (status 125,
with the instruction bytes in the message).
"""

from __future__ import annotations

import ctypes
import struct
from collections import Counter

from ..kvm import uapi as K
from ..kvm.sys import flat_segment, ioctl_raw

INT3, FWAIT, CLD = b"\xcc", b"\x9b", 0xFC
MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000084
X86_EFLAGS_DF = 1 << 10
# what may come before the `cld` of Linux's asm_exc_page_fault: ENDBR64, then ASM_CLAC
# (CLAC or the NOPs the alternative leaves)
PF_ENTRY_PREFIXES = (b"\xf3\x0f\x1e\xfa", b"\x0f\x01\xca", b"\x0f\x1f\x00", b"\x90\x90\x90",
                     b"\x66\x90\x90", b"\x90\x66\x90")
BP_VECTOR, PF_VECTOR = 3, 14
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class KvmFpu(ctypes.Structure):
    """struct kvm_fpu (KVM_GET_FPU / KVM_SET_FPU)."""

    _fields_ = [("fpr", ctypes.c_uint8 * 128), ("fcw", ctypes.c_uint16),
                ("fsw", ctypes.c_uint16), ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8),
                ("last_opcode", ctypes.c_uint16), ("last_ip", ctypes.c_uint64),
                ("last_dp", ctypes.c_uint64), ("xmm", ctypes.c_uint8 * 256),
                ("mxcsr", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


KVM_GET_FPU = (2 << 30) | (ctypes.sizeof(KvmFpu) << 16) | (0xAE << 8) | 0x8C
KVM_SET_FPU = (1 << 30) | (ctypes.sizeof(KvmFpu) << 16) | (0xAE << 8) | 0x8D


class HostFixups:
    """The VMM's answers to the internal errors a Linux guest meets on this host."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.counts: Counter = Counter()
        self.last = ""
        self.pf_hook: tuple[int, int] | None = None  # (linear, physical) of the int3 we put
        self.exits_unhooked = 0

    def handle(self, v) -> bool:
        """Handle *v*'s KVM_EXIT_INTERNAL_ERROR; False if it is none we know (a failure)."""
        run = v.run
        r = K.kvm_regs()
        s = K.kvm_sregs()
        ioctl_raw(v.fd, K.KVM_GET_REGS, r)
        ioctl_raw(v.fd, K.KVM_GET_SREGS, s)
        insn = self.read_linear(v, s.cs.base + r.rip, 16)
        data = [run.u.internal.data[i] for i in range(min(run.u.internal.ndata, 16))]
        self.last = (f"suberror {run.u.internal.suberror} data "
                     f"{' '.join(hex(d) for d in data)} insn {insn.hex()} cs {s.cs.selector:#x} "
                     f"cr2 {s.cr2:#x}")
        if self.pf_hook is not None and s.cs.base + r.rip == self.pf_hook[0]:
            self.page_fault_entry(v, r, s)
            return True
        if insn[:1] == INT3:
            # deliver the #BP the instruction raises: a trap, the frame's RIP after the int3
            self.set_rip(v, r, r.rip + 1)
            self.inject_exception(v, BP_VECTOR)
            self.counts["fixup: int3 -> #BP"] += 1
            return True
        if self.mxcsr_access(v, r, s, insn):
            return True
        if insn[:1] == FWAIT:
            # nothing unmasked is pending in the x87 state Linux keeps: complete it
            self.set_rip(v, r, r.rip + 1)
            self.counts["fixup: fwait completed"] += 1
            return True
        return False

    def set_rip(self, v, r, rip: int) -> None:
        r.rip = rip
        v.ioctl(K.KVM_SET_REGS, r)

    def inject_exception(self, v, nr: int, error_code: int | None = None) -> None:
        ev = K.kvm_vcpu_events()
        v.ioctl(K.KVM_GET_VCPU_EVENTS, ev)
        ev.flags = 0
        ev.exception.injected = 1
        ev.exception.pending = 0
        ev.exception.nr = nr
        ev.exception.has_error_code = int(error_code is not None)
        ev.exception.error_code = error_code or 0
        v.ioctl(K.KVM_SET_VCPU_EVENTS, ev)

    def translate(self, v, linear: int) -> int | None:
        t = K.kvm_translation(linear_address=linear & ((1 << 64) - 1))
        if ioctl_raw(v.fd, K.KVM_TRANSLATE, t)[0] != 0 or not t.valid:
            return None
        return t.physical_address

    def read_linear(self, v, linear: int, n: int) -> bytes:
        """*n* bytes at a guest linear address (b"" if not mapped to RAM)."""
        out = b""
        mem = self.machine.mem
        while len(out) < n:
            gpa = self.translate(v, linear + len(out))
            if gpa is None or gpa >= self.machine.ram_size:
                break
            chunk = min(n - len(out), 0x1000 - (gpa & 0xFFF))
            out += bytes(mem[gpa:gpa + chunk])
        return out

    # -- SYSCALL from user mode (host difference) --
    def hook_page_faults(self, v) -> bool:
        """Put an int3 on the ``cld`` at the start of the guest's #PF handler (IDT vector 14),
        once the kernel has installed it: this host ends the int3 in an internal error, which
        lets the VMM see every #PF the guest takes (see :meth:`page_fault_entry`). Returns
        whether the hook is in place."""
        if self.pf_hook is not None:
            return True
        s = K.kvm_sregs()
        v.ioctl(K.KVM_GET_SREGS, s)
        if s.idt.limit < 15 * 16 - 1:
            return False
        gate = self.read_linear(v, s.idt.base + 14 * 16, 16)
        if len(gate) < 16 or not gate[5] & 0x80:
            return False
        lo, sel, _ist, _type, mid, hi = struct.unpack_from("<HHBBHI", gate)
        handler = lo | mid << 16 | hi << 32
        code = self.read_linear(v, handler, 12)
        off = 0
        for _ in range(3):
            if code[off:off + 1] == bytes((CLD,)):
                break
            nxt = next((p for p in PF_ENTRY_PREFIXES if code.startswith(p, off)), None)
            if nxt is None:
                return False
            off += len(nxt)
        else:
            return False
        gpa = self.translate(v, handler + off)
        if gpa is None or code[off] != CLD:
            return False
        self.machine.mem[gpa] = INT3[0]
        self.pf_hook = (handler + off, gpa)
        return True

    def page_fault_entry(self, v, r, s) -> None:
        """The guest entered its #PF handler. On this host SYSCALL in user mode sets RIP to
        LSTAR (and RCX, R11, RFLAGS) but stays at CPL 3, so the fetch at LSTAR faults: such a
        fault (frame RIP = LSTAR, CS from user mode) becomes the SYSCALL it should have been
        -- CPL 0 with STAR's selectors at LSTAR, the user RSP, RFLAGS masked by FMASK. Any
        other #PF goes on: the ``cld`` the hook replaced is done here."""
        frame = self.read_linear(v, s.ss.base + r.rsp, 48)
        if len(frame) == 48:
            _err, rip, cs, rflags, rsp, _ss = struct.unpack("<6Q", frame)
            if cs & 3 == 3 and rip == v.get_msr(MSR_LSTAR):  # read now: set per CPU
                star = v.get_msr(MSR_STAR)
                kcs = (star >> 32) & 0xFFFC
                flat_segment(s.cs, kcs, type_=0xB, db=0, long=1)
                flat_segment(s.ss, kcs + 8, type_=0x3, db=1, long=0)
                v.ioctl(K.KVM_SET_SREGS, s)
                r.rip, r.rsp = rip, rsp
                r.rflags = (rflags & ~v.get_msr(MSR_SYSCALL_MASK)) | 2
                v.ioctl(K.KVM_SET_REGS, r)
                self.counts["fixup: user SYSCALL completed"] += 1
                return
        r.rflags &= ~X86_EFLAGS_DF
        r.rip += 1
        v.ioctl(K.KVM_SET_REGS, r)
        self.counts["fixup: #PF seen"] += 1

    # -- L6: LDMXCSR / STMXCSR (0F AE /2, /3) in the kernel (kernel_fpu_begin) --
    def mxcsr_access(self, v, r, s, insn: bytes) -> bool:
        """Emulate LDMXCSR/STMXCSR with a memory operand through KVM_GET/SET_FPU."""
        i, rex, seg_base = 0, 0, 0
        while i < len(insn) and insn[i] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0xF2,
                                            0xF3):
            if insn[i] == 0x64:
                seg_base = s.fs.base
            elif insn[i] == 0x65:
                seg_base = s.gs.base
            i += 1
        if i < len(insn) and 0x40 <= insn[i] <= 0x4F:
            rex = insn[i]
            i += 1
        if insn[i:i + 2] != b"\x0f\xae" or len(insn) < i + 3:
            return False
        modrm = insn[i + 2]
        mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        if mod == 3 or reg not in (2, 3):
            return False
        i += 3
        regs = [getattr(r, n) for n in GPR_ORDER]
        if rm == 4:
            sib = insn[i]
            i += 1
            scale, index, base = sib >> 6, ((sib >> 3) & 7) | (rex & 2) << 2, sib & 7
            addr = 0 if index == 4 else regs[index] << scale
            if base == 5 and mod == 0:
                addr += struct.unpack_from("<i", insn, i)[0]
                i += 4
            else:
                addr += regs[base | (rex & 1) << 3]
        elif rm == 5 and mod == 0:
            addr = None  # RIP-relative: the displacement counts from the next instruction
        else:
            addr = regs[rm | (rex & 1) << 3]
        if mod == 1:
            disp = struct.unpack_from("<b", insn, i)[0]
            i += 1
        elif mod == 2 or (mod == 0 and rm == 5):
            disp = struct.unpack_from("<i", insn, i)[0]
            i += 4
        else:
            disp = 0
        if addr is None:
            addr = r.rip + i
        linear = (seg_base + addr + disp) & ((1 << 64) - 1)
        gpa = self.translate(v, linear)
        if gpa is None or gpa + 4 > self.machine.ram_size or (gpa & 0xFFF) > 0xFFC:
            return False
        fpu = KvmFpu()
        v.ioctl(KVM_GET_FPU, fpu)
        mem = self.machine.mem
        if reg == 2:
            fpu.mxcsr = struct.unpack_from("<I", mem, gpa)[0]
            v.ioctl(KVM_SET_FPU, fpu)
        else:
            struct.pack_into("<I", mem, gpa, fpu.mxcsr)
        self.set_rip(v, r, r.rip + i)
        self.counts[f"fixup: {'ldmxcsr' if reg == 2 else 'stmxcsr'} emulated"] += 1
        return True
