/*
 * apicv guest agent: the guest side of the real-KVM backend (src/apicv/kvm/vcpu.py).
 *
 * Runs in 64-bit long mode, set up by the host with KVM_SET_SREGS/KVM_SET_REGS (identity map
 * of 0..4 GiB with 2 MiB pages, flat GDT, busy TSS, 256-entry IDT pointing at the stubs
 * below). %r15 holds the address of this vCPU's mailbox and is never changed; %rsp is the
 * top of this vCPU's stack. Every guest operation ends with an OUT to PORT_DONE, which KVM
 * hands to userspace; the host then writes the next command and runs KVM_RUN again, so the
 * agent continues after the OUT and picks up the command. Never HLT: with an in-kernel
 * irqchip a halted vCPU does not come back to userspace.
 *
 * Mailbox field offsets (MB_*), commands (CMD_*), ports (PORT_*) and sizes come from the host
 * as --defsym symbols, so apicv/kvm/agent.py is the only place that defines them.
 *
 * Position independent (RIP-relative only): the host loads the flat binary anywhere and
 * finds the entry point, the IDT stubs, the SMM handler and the reset stub through the
 * header at offset 0.
 */

	.code64
	.text
agent_base:
	.ascii	"APICVAG1"			/* magic */
	.long	entry - agent_base		/* 0x08 */
	.long	stub_table - agent_base		/* 0x0c: 256 x .long stub offset */
	.long	smm_handler - agent_base	/* 0x10 */
	.long	smm_handler_end - smm_handler	/* 0x14 */
	.long	reset_stub - agent_base		/* 0x18 */
	.long	reset_stub_end - reset_stub	/* 0x1c */

/* ------------------------------------------------------------------ main loop */
entry:
	cld
main_loop:
	/* the host asked to (re)map the APIC window PDE: do it as a guest store, so that KVM's
	   shadow MMU sees the page-table write, then flush the stale translation */
	cmpl	$0, MB_WIN_SET(%r15)
	je	1f
	movq	MB_WIN_PDE_ADDR(%r15), %rax
	movq	MB_WIN_PDE(%r15), %rdx
	movq	%rdx, (%rax)
	movq	MB_APIC_VA(%r15), %rax
	invlpg	(%rax)
	movl	$0, MB_WIN_SET(%r15)
1:
	movl	$0, MB_FAULT(%r15)
	movl	MB_CMD(%r15), %eax
	cmpl	$CMD_MMIO_READ, %eax
	je	do_mmio_read
	cmpl	$CMD_MMIO_WRITE, %eax
	je	do_mmio_write
	cmpl	$CMD_RDMSR, %eax
	je	do_rdmsr
	cmpl	$CMD_WRMSR, %eax
	je	do_wrmsr
	cmpl	$CMD_WRITE_CR8, %eax
	je	do_write_cr8
	cmpl	$CMD_READ_CR8, %eax
	je	do_read_cr8
	cmpl	$CMD_TAKE_INTERRUPTS, %eax
	je	do_take_interrupts
	cmpl	$CMD_LOAD, %eax
	je	do_mmio_read
	cmpl	$CMD_STORE, %eax
	je	do_mmio_write
	cmpl	$CMD_IN, %eax
	je	do_in
	cmpl	$CMD_OUT, %eax
	je	do_out
	/* CMD_RUN and anything unknown: nothing to do */
done:
	/* settle: this host injects at most one event per entry from userspace, so an event that
	   upstream KVM would inject in the same KVM_RUN (a second NMI after the first one's
	   IRET, through an NMI-window exit) needs another entry. Kick until a kick brings
	   nothing new. */
	movl	MB_LOG_COUNT(%r15), %esi
	movw	$PORT_KICK, %dx
	outb	%al, %dx
	cmpl	MB_LOG_COUNT(%r15), %esi
	jne	done
	movl	MB_SEQ(%r15), %eax
	movl	%eax, MB_DONE(%r15)
	movw	$PORT_DONE, %dx
	outb	%al, %dx
	jmp	main_loop

/* ------------------------------------------------------------------ loads and stores
 * A load or store of MB_SIZE bytes at the virtual address MB_ARG0: xAPIC MMIO (CMD_MMIO_*),
 * IOAPIC MMIO and guest RAM (CMD_LOAD / CMD_STORE; both identity-mapped below 4 GiB).
 */
do_mmio_read:
	movq	MB_ARG0(%r15), %rbx		/* virtual address of the register */
	movl	MB_SIZE(%r15), %ecx
	xorl	%eax, %eax
	cmpl	$1, %ecx
	jne	1f
	movb	(%rbx), %al
	jmp	2f
1:	cmpl	$2, %ecx
	jne	1f
	movw	(%rbx), %ax
	jmp	2f
1:	cmpl	$4, %ecx
	jne	1f
	movl	(%rbx), %eax
	jmp	2f
1:	movq	(%rbx), %rax
2:	movq	%rax, MB_RESULT(%r15)
	jmp	done

do_mmio_write:
	movq	MB_ARG0(%r15), %rbx
	movq	MB_ARG1(%r15), %rax
	movl	MB_SIZE(%r15), %ecx
	cmpl	$1, %ecx
	jne	1f
	movb	%al, (%rbx)
	jmp	done
1:	cmpl	$2, %ecx
	jne	1f
	movw	%ax, (%rbx)
	jmp	done
1:	cmpl	$4, %ecx
	jne	1f
	movl	%eax, (%rbx)
	jmp	done
1:	movq	%rax, (%rbx)
	jmp	done

/* ------------------------------------------------------------------ port I/O
 * One byte IN from / OUT to port MB_ARG0 (the host allows only the in-kernel PIC's ports).
 */
do_in:
	movl	MB_ARG0(%r15), %edx
	xorl	%eax, %eax
	inb	%dx, %al
	movq	%rax, MB_RESULT(%r15)
	jmp	done

do_out:
	movl	MB_ARG0(%r15), %edx
	movl	MB_ARG1(%r15), %eax
	outb	%al, %dx
	jmp	done

/* ------------------------------------------------------------------ MSRs and CR8 */
do_rdmsr:
	movl	MB_ARG0(%r15), %ecx
	xorl	%eax, %eax
	xorl	%edx, %edx
rdmsr_insn:
	rdmsr					/* a #GP here sets MB_FAULT and skips these 2 bytes */
	shlq	$32, %rdx
	orq	%rdx, %rax
	movq	%rax, MB_RESULT(%r15)
	jmp	done

do_wrmsr:
	movl	MB_ARG0(%r15), %ecx
	movl	MB_ARG1(%r15), %eax
	movl	MB_ARG1+4(%r15), %edx
wrmsr_insn:
	wrmsr					/* a #GP here sets MB_FAULT and skips these 2 bytes */
	jmp	done

do_write_cr8:
	movq	MB_ARG1(%r15), %rax
	movq	%rax, %cr8
	jmp	done

do_read_cr8:
	movq	%cr8, %rax
	movq	%rax, MB_RESULT(%r15)
	jmp	done

/* ------------------------------------------------------------------ interrupt window
 * STI, then keep exiting (OUT to PORT_KICK, which the host answers with another KVM_RUN):
 * this host's KVM injects a pending interrupt only at VM entry, one per entry, and only on
 * an entry from userspace (exits KVM handles in the kernel, e.g. IN from the in-kernel PIC,
 * do not give it a chance: KVM_REQ_EVENT was consumed while IF was 0 and no interrupt-window
 * exit comes). Stop after MB_IDLE_MAX iterations in a row without a new log entry, when the
 * window has taken MB_LIMIT interrupts, or after MB_ITER_MAX iterations; then CLI.
 */
do_take_interrupts:
	movl	$0, MB_WIN_COUNT(%r15)
	movl	$0, MB_ITERATIONS(%r15)
	cmpl	$0, MB_LIMIT(%r15)
	je	done
	xorl	%ebx, %ebx			/* idle iterations in a row */
	xorl	%r12d, %r12d			/* iterations */
	sti
take_loop:
	movl	MB_LOG_COUNT(%r15), %esi
	movw	$PORT_KICK, %dx
	outb	%al, %dx			/* exit to userspace and back: an injection chance */
	cmpl	MB_LOG_COUNT(%r15), %esi
	jne	took
	incl	%ebx
	cmpl	MB_IDLE_MAX(%r15), %ebx
	jae	take_end
	jmp	take_next
took:
	xorl	%ebx, %ebx
	movl	MB_WIN_COUNT(%r15), %eax
	cmpl	MB_LIMIT(%r15), %eax
	jae	take_end
take_next:
	incl	%r12d
	cmpl	MB_ITER_MAX(%r15), %r12d
	jb	take_loop
take_end:
	cli
	movl	%r12d, MB_ITERATIONS(%r15)
	jmp	done

/* ------------------------------------------------------------------ handlers */

/* log_vector: append %al to the interrupt log (clobbers %rcx); a slot is claimed with
   LOCK XADD so that an NMI arriving in the middle keeps its own slot and order */
log_vector:
	movl	$1, %ecx
	lock xaddl %ecx, MB_LOG_COUNT(%r15)
	cmpl	$LOG_CAPACITY, %ecx
	jae	1f
	movb	%al, MB_LOG(%r15, %rcx)
	ret
1:	lock incl MB_LOG_DROPPED(%r15)
	lock decl MB_LOG_COUNT(%r15)
	ret

/* vectors 0x10-0xff: [rsp] = vector, then the interrupt frame (RIP, CS, RFLAGS, RSP, SS) */
irq_common:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	movq	24(%rsp), %rax
	call	log_vector
	cmpl	$0, MB_EOI(%r15)
	je	2f
	/* PV EOI (Linux's kvm_guest_apic_eoi_write): when MSR_KVM_PV_EOI_EN is enabled the host
	   puts its 4-byte aligned GPA in MB_PV_EOI (identity-mapped RAM); if KVM armed the flag
	   (bit 0 set), clearing it is the EOI -- KVM completes it at the next exit */
	movq	MB_PV_EOI(%r15), %rax
	testq	%rax, %rax
	jz	4f
	lock btrl $0, (%rax)
	jnc	4f
	incl	MB_PV_EOI_SKIPPED(%r15)		/* the flag was set: no EOI write */
	jmp	2f
4:	cmpl	$0, MB_X2APIC(%r15)
	je	1f
	movl	$0x80b, %ecx			/* x2APIC EOI MSR */
	xorl	%eax, %eax
	xorl	%edx, %edx
eoi_wrmsr_insn:
	wrmsr
	jmp	2f
1:	movq	MB_APIC_VA(%r15), %rax
	movl	$0, 0xb0(%rax)			/* xAPIC EOI register */
2:	incl	MB_WIN_COUNT(%r15)
	movl	MB_WIN_COUNT(%r15), %eax
	cmpl	MB_LIMIT(%r15), %eax
	jb	3f
	andq	$~0x200, 48(%rsp)		/* limit reached: IRETQ restores IF=0 */
3:	popq	%rdx
	popq	%rcx
	popq	%rax
	addq	$8, %rsp
	iretq

nmi_handler:
	pushq	%rax
	pushq	%rcx
	movl	$2, %eax
	call	log_vector
	popq	%rcx
	popq	%rax
	iretq

/* #GP: [rsp] = error code, [rsp+8] = RIP. Expected only on the agent's RDMSR/WRMSR (record
   vector 13) and on the handler's x2APIC EOI WRMSR (ignored); anything else is fatal. */
gp_handler:
	pushq	%rax
	leaq	rdmsr_insn(%rip), %rax
	cmpq	%rax, 16(%rsp)
	je	1f
	leaq	wrmsr_insn(%rip), %rax
	cmpq	%rax, 16(%rsp)
	je	1f
	leaq	eoi_wrmsr_insn(%rip), %rax
	cmpq	%rax, 16(%rsp)
	je	2f
	popq	%rax
	pushq	$13
	jmp	exc_common
1:	movl	$13, MB_FAULT(%r15)
2:	addq	$2, 16(%rsp)			/* RDMSR and WRMSR are 2 bytes long */
	popq	%rax
	addq	$8, %rsp
	iretq

/* an exception the agent does not expect: [rsp] = vector, [rsp+8] = error code (0 if the
   exception has none), [rsp+16] = RIP. Report it and stay parked: the host re-establishes
   the agent before the next operation. */
exc_common:
	movq	(%rsp), %rax
	movq	%rax, MB_EXC_VECTOR(%r15)
	movq	8(%rsp), %rax
	movq	%rax, MB_EXC_ERROR(%r15)
	movq	16(%rsp), %rax
	movq	%rax, MB_EXC_RIP(%r15)
	movw	$PORT_EXCEPTION, %dx
1:	outb	%al, %dx
	jmp	1b

/* ------------------------------------------------------------------ IDT stubs */
	.altmacro
	.macro	vector_stub v
	.balign	16
vector_stub_\v:
	.if \v == 2
	jmp	nmi_handler
	.elseif \v == 13
	jmp	gp_handler
	.elseif \v < 16
	.if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 14)
	.else
	pushq	$0				/* no error code: keep the frame uniform */
	.endif
	pushq	$\v
	jmp	exc_common
	.else
	pushq	$\v
	jmp	irq_common
	.endif
	.endm

	.macro	stub_entry v
	.long	vector_stub_\v - agent_base
	.endm

	.set	vec, 0
	.rept	256
	vector_stub %vec
	.set	vec, vec + 1
	.endr

	.balign	4
stub_table:
	.set	vec, 0
	.rept	256
	stub_entry %vec
	.set	vec, vec + 1
	.endr

/* ------------------------------------------------------------------ copied elsewhere */

/* SMM handler, copied to SMBASE + 0x8000 (0x38000): return from SMM at once. */
	.code16
smm_handler:
	rsm
smm_handler_end:

/* Reset stub, copied to 0xfffffff0: after an INIT the BSP restarts here in real mode;
   tell the host (it re-establishes long mode before the next operation). */
reset_stub:
	movw	$PORT_RESET, %dx
1:	outb	%al, %dx
	jmp	1b
reset_stub_end:
	.code64
