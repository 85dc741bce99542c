/*
 * Multiboot v1 entry, the switch to long mode, the AP trampoline and the interrupt stubs.
 *
 * Loader contract: 32-bit protected mode, paging off, flat segments, EBX = multiboot info.
 * This host's KVM cannot IRET in 32-bit protected mode without paging, so nothing runs
 * there: we build a 4 GiB identity map of 2 MiB pages (it covers the IOAPIC at 0xfec00000
 * and the LAPIC at 0xfee00000), enable PAE + EFER.LME + paging and jump to 64-bit code.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0
#define MAX_CPUS 16
#define STACK_SHIFT 14 /* 16 KiB per CPU */
#define TRAMPOLINE_ADDR 0x8000
#define TRAMP(sym) ((sym) - ap_trampoline + TRAMPOLINE_ADDR)

/* PAE, CR3, EFER.LME, CR0.PG, from 32-bit code; no stack (APs start together). */
	.macro ENTER_LONG_MODE
	mov %cr4, %eax
	or $0x20, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx
	rdmsr
	or $0x100, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax
	mov %eax, %cr0
	.endm

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .data
	.align 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff /* 0x10: flat data */
	.quad 0x00cf9a000000ffff /* 0x18: flat 32-bit code (AP trampoline) */
gdt_end:
	.align 4
	.word 0
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.globl mb_info
mb_info:
	.long 0

	.section .bss
	.align 4096
	.globl pml4
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096
	.globl ap_stacks
ap_stacks:
	.skip MAX_CPUS << STACK_SHIFT
bsp_stack:
	.skip 1 << STACK_SHIFT
bsp_stack_top:

	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	cli
	cld
	mov %ebx, %esi
	/* mask both 8259s before anything else */
	mov $0xff, %al
	out %al, $0x21
	out %al, $0xa1
	/* zero .bss (the loader should have; do not depend on it) */
	mov $__bss_start, %edi
	mov $__bss_end, %ecx
	sub %edi, %ecx
	xor %eax, %eax
	rep stosb
	mov %esi, mb_info
	mov $bsp_stack_top, %esp

	/* PML4[0] -> PDPT; PDPT[0..3] -> 4 page directories; 2048 2 MiB pages */
	mov $pdpt + 3, %eax
	mov %eax, pml4
	mov $pdpt, %edi
	mov $pd + 3, %eax
	mov $4, %ecx
1:	mov %eax, (%edi)
	add $0x1000, %eax
	add $8, %edi
	loop 1b
	mov $pd, %edi
	mov $0x83, %eax		/* present, writable, 2 MiB */
	mov $2048, %ecx
2:	mov %eax, (%edi)
	add $0x200000, %eax
	add $8, %edi
	loop 2b

	lgdt gdt_desc
	ENTER_LONG_MODE
	ljmp $0x08, $start64

	.code64
start64:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %ax, %fs
	mov %ax, %gs
	mov $bsp_stack_top, %rsp
	xor %ebp, %ebp
	call bsp_main
	jmp halt_forever

/* An AP arrives here from the trampoline, in long mode on the BSP's page tables. */
	.globl ap_start64
ap_start64:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %ax, %fs
	mov %ax, %gs
	mov $1, %eax
	cpuid
	shr $24, %ebx		/* initial APIC ID selects the stack */
	cmp $MAX_CPUS, %ebx
	jae halt_forever
	mov %ebx, %eax
	inc %eax
	shl $STACK_SHIFT, %rax
	add $ap_stacks, %rax
	mov %rax, %rsp
	xor %ebp, %ebp
	mov %ebx, %edi
	call ap_main
halt_forever:
	cli
	hlt
	jmp halt_forever

/*
 * The AP trampoline: copied to TRAMPOLINE_ADDR (0x8000, SIPI vector 0x08) by
 * copy_trampoline(). Real mode at CS=0x0800, IP=0 -> 32-bit protected mode with the
 * kernel's GDT -> long mode -> ap_start64. Everything it addresses itself is TRAMP().
 */
	.globl ap_trampoline, ap_trampoline_end
	.code16
ap_trampoline:
	cli
	cld
	xor %ax, %ax
	mov %ax, %ds
	lgdtl TRAMP(tramp_gdt_desc)
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $0x18, $TRAMP(tramp32)
	.code32
tramp32:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	ENTER_LONG_MODE
	ljmp $0x08, $ap_start64	/* absolute: back into the kernel image */
	.align 4
	.word 0
tramp_gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
ap_trampoline_end:

/*
 * 256 interrupt stubs, 16 bytes apart (idt.c computes isr_stubs + 16 * vector). Each
 * pushes a zero error code when the CPU does not push one, then its vector number.
 */
	.code64
	.text
	.align 16
	.globl isr_stubs
isr_stubs:
	vec = 0
	.rept 256
	.align 16
	.if (vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30) == 0
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	vec = vec + 1
	.endr

isr_common:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	cld
	call irq_dispatch
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp
	iretq
	.section .note.GNU-stack, "", @progbits
