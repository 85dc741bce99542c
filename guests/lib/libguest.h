/*
 * libguest: the small runtime every apicv guest test kernel links against.
 *
 * The kernels are multiboot v1 ELF images. boot.S switches from the loader's 32-bit
 * protected mode to 64-bit long mode (identity map of the first 4 GiB), and calls
 * bsp_main() (main.c), which sets up the IDT, the serial port and the per-CPU area
 * and then calls the program's test_main().
 */
#ifndef LIBGUEST_H
#define LIBGUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef int s32;
typedef long s64;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define barrier() asm volatile("" ::: "memory")
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ---------------------------------------------------------------- CPU access */

static inline void outb(u8 v, u16 port) { asm volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 v, u16 port) { asm volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u32 v, u16 port) { asm volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* A harmless port read: every call is a VM exit, which lets the VMM inject. */
static inline void io_delay(void) { (void)inb(0x80); }
static inline void cpu_relax(void) { asm volatile("pause" ::: "memory"); }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	asm volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

/* RDMSR/WRMSR that return the exception vector they raised (0 = none). */
int rdmsr_safe(u32 msr, u64 *v);
int wrmsr_safe(u32 msr, u64 v);

static inline void cpuid_count(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline u32 cpuid_reg(u32 leaf, int reg)
{
	u32 r[4];
	cpuid_count(leaf, 0, &r[0], &r[1], &r[2], &r[3]);
	return r[reg];
}

static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }
/* STI's one-instruction shadow covers HLT: no interrupt slips in between. */
static inline void sti_hlt(void) { asm volatile("sti; hlt" ::: "memory"); }
/* STI then a port read: the exit after the shadow lets the VMM inject. */
static inline void sti_io(void) { asm volatile("sti; inb $0x80, %%al" ::: "eax", "memory"); }

static inline u64 read_rflags(void)
{
	u64 f;
	asm volatile("pushfq; popq %0" : "=r"(f) :: "memory");
	return f;
}
static inline bool irqs_enabled(void) { return (read_rflags() >> 9) & 1; }
static inline u64 irq_save(void)
{
	u64 f = read_rflags();
	cli();
	return f;
}
static inline void irq_restore(u64 f)
{
	if (f & 0x200)
		sti();
}

static inline u64 read_cr8(void)
{
	u64 v;
	asm volatile("mov %%cr8, %0" : "=r"(v) :: "memory");
	return v;
}
static inline void write_cr8(u64 v) { asm volatile("mov %0, %%cr8" :: "r"(v) : "memory"); }

/* CPUID feature bits this code cares about */
#define CPUID1_ECX_X2APIC (1u << 21)
#define CPUID1_ECX_TSC_DEADLINE (1u << 24)
#define CPUID1_EDX_APIC (1u << 9)

static inline u32 cpuid_apic_id(void) { return cpuid_reg(1, 1) >> 24; }
static inline bool cpu_has_x2apic(void) { return cpuid_reg(1, 2) & CPUID1_ECX_X2APIC; }
static inline bool cpu_has_tsc_deadline(void) { return cpuid_reg(1, 2) & CPUID1_ECX_TSC_DEADLINE; }

/* ---------------------------------------------------------------- spinlocks */

typedef struct { volatile u32 v; } spinlock_t;
void spin_lock(spinlock_t *l);
void spin_unlock(spinlock_t *l);

static inline u32 atomic_inc(volatile u32 *p)
{
	u32 v = 1;
	asm volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) :: "memory");
	return v + 1;
}

/* ---------------------------------------------------------------- time */

extern u64 tsc_khz;        /* TSC frequency (kvmclock), or an assumed 3 GHz */
extern bool tsc_khz_known; /* true when it came from kvmclock */
static inline u64 ms_to_tsc(u64 ms) { return ms * tsc_khz; }
static inline u64 us_to_tsc(u64 us) { return us * tsc_khz / 1000; }
static inline u64 tsc_to_us(u64 c) { return c * 1000 / tsc_khz; }
void delay_us(u64 us);      /* busy wait with VM exits (interrupts can be taken) */
void spin_delay_us(u64 us); /* busy wait without exits */

/*
 * wait_until(cond, ms): poll cond with a VM exit per iteration (so pending interrupts
 * get injected when IF=1); give up after ms milliseconds. Evaluates to cond's final value.
 * spin_until: the same with PAUSE only, for waiting on another CPU's memory writes.
 */
#define wait_until(cond, ms)                                       \
	({                                                          \
		u64 __end = rdtsc() + ms_to_tsc(ms);                \
		while (!(cond) && rdtsc() < __end)                  \
			io_delay();                                 \
		(bool)(cond);                                       \
	})
#define spin_until(cond, ms)                                       \
	({                                                          \
		u64 __end = rdtsc() + ms_to_tsc(ms);                \
		while (!(cond) && rdtsc() < __end)                  \
			cpu_relax();                                \
		(bool)(cond);                                       \
	})

/* ---------------------------------------------------------------- output, reports */

int vsnprintf(char *buf, int size, const char *fmt, va_list ap);
int snprintf(char *buf, int size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void puts_serial(const char *s);

void pass(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* PASS or FAIL with the same message; returns ok */
bool report(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/*
 * report_unless(why, ok, ...): when why is non-NULL the check cannot be made on this
 * platform: print "SKIP: <msg> [<why>]" (same message, reason in brackets), else report.
 */
bool report_unless(const char *why, bool ok, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void exit(int code) __attribute__((noreturn));
void abort_test(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
extern u32 tests_run, tests_failed;

/* The reason string programs print when this host's in-kernel LAPIC left ISR empty. */
#define ISR_QUIRK "ISR not set by this host's in-kernel LAPIC"

/* ---------------------------------------------------------------- memory helpers */

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);
u64 strlen(const char *s);

/* ---------------------------------------------------------------- interrupts */

struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

typedef void (*handler_t)(struct frame *f);
/*
 * Every vector goes through irq_dispatch: it counts the vector in
 * irq_count[cpu][vector] first, then calls the handler set here. With no handler, a
 * vector 32..254 is EOI'd, 255 (our spurious vector) is not, and an exception that no
 * *_safe() accessor expects ends the test with a FAIL.
 */
void set_handler(int vector, handler_t h);
void load_idt(void);

#define MAX_CPUS 16
extern volatile u32 irq_count[MAX_CPUS][256];

/* ---------------------------------------------------------------- per CPU */

struct percpu {
	struct percpu *self; /* must stay first: this_cpu() reads %gs:0 */
	u32 id;              /* initial APIC ID (CPUID.1:EBX[31:24]); our CPU index */
	int x2apic;          /* the APIC is in x2APIC mode */
	volatile int fault_vector; /* last exception a *_safe accessor caught */
	/* bring-up facts an AP records */
	volatile u32 boots;
	volatile u32 online;
	u32 spiv_at_boot;
	u32 apic_id_reg;
	u64 apic_base_msr;
	/* mailbox: on_cpu() */
	void (*volatile fn)(void *);
	void *volatile arg;
	volatile u32 req_seq, done_seq;
};

extern struct percpu percpu[MAX_CPUS];
static inline struct percpu *this_cpu(void)
{
	struct percpu *p;
	asm volatile("movq %%gs:0, %0" : "=r"(p));
	return p;
}
static inline u32 smp_id(void) { return this_cpu()->id; }

/* ---------------------------------------------------------------- local APIC */

#define APIC_ID 0x20
#define APIC_LVR 0x30
#define APIC_TPR 0x80
#define APIC_APR 0x90
#define APIC_PPR 0xa0
#define APIC_EOI 0xb0
#define APIC_LDR 0xd0
#define APIC_DFR 0xe0
#define APIC_SPIV 0xf0
#define APIC_ISR 0x100
#define APIC_TMR 0x180
#define APIC_IRR 0x200
#define APIC_ESR 0x280
#define APIC_ICR 0x300
#define APIC_ICR2 0x310
#define APIC_LVTT 0x320
#define APIC_LVTTHMR 0x330
#define APIC_LVTPC 0x340
#define APIC_LVT0 0x350
#define APIC_LVT1 0x360
#define APIC_LVTERR 0x370
#define APIC_TMICT 0x380
#define APIC_TMCCT 0x390
#define APIC_TDCR 0x3e0
#define APIC_SELF_IPI 0x3f0 /* x2APIC only (MSR 0x83f) */

/* ICR low fields */
#define ICR_FIXED 0x000
#define ICR_LOWEST 0x100
#define ICR_SMI 0x200
#define ICR_NMI 0x400
#define ICR_INIT 0x500
#define ICR_STARTUP 0x600
#define ICR_LOGICAL 0x800
#define ICR_BUSY 0x1000
#define ICR_ASSERT 0x4000
#define ICR_LEVEL 0x8000
#define ICR_SELF 0x40000
#define ICR_ALL 0x80000
#define ICR_ALL_BUT_SELF 0xc0000

/* LVT fields */
#define LVT_MASKED (1u << 16)
#define LVT_TIMER_ONESHOT (0u << 17)
#define LVT_TIMER_PERIODIC (1u << 17)
#define LVT_TIMER_TSCDEADLINE (2u << 17)

#define MSR_IA32_APICBASE 0x1b
#define APICBASE_BSP (1u << 8)
#define APICBASE_EXTD (1u << 10)
#define APICBASE_EN (1u << 11)
#define MSR_IA32_TSC 0x10
#define MSR_TSC_DEADLINE 0x6e0
#define MSR_X2APIC_BASE 0x800
#define MSR_GS_BASE 0xc0000101

#define APIC_MMIO 0xfee00000ul
#define SPURIOUS_VECTOR 0xff
#define WAKE_VECTOR 0x30 /* on_cpu() wakes a halted AP with this fixed IPI */

/* Register offsets are the xAPIC ones; in x2APIC mode they become MSR 0x800 + off/16. */
u32 apic_read(u32 reg);
void apic_write(u32 reg, u32 val);
int apic_read_safe(u32 reg, u32 *val);   /* exception vector or 0 */
int apic_write_safe(u32 reg, u32 val);
/* Send an IPI: xAPIC writes ICR2 (dest << 24) then ICR; x2APIC one WRMSR to 0x830. */
void apic_icr(u32 dest, u32 low);
void apic_eoi(void);
u32 apic_id(void);        /* from the ID register, in the current mode */
bool apic_x2apic_mode(void);
int enable_x2apic(void);  /* 0, or the exception vector WRMSR raised */
void apic_sw_enable(void);
/* bit helpers for the 256-bit IRR/ISR/TMR register arrays */
bool apic_vector_bit(u32 base, int vector);

/* ---------------------------------------------------------------- IOAPIC */

#define IOAPIC_MMIO 0xfec00000ul
u32 ioapic_read(u32 index);
void ioapic_write(u32 index, u32 val);
u64 ioapic_read_rte(int pin);
void ioapic_write_rte(int pin, u64 rte); /* writes high dword then low */
#define RTE_LEVEL (1u << 15)
#define RTE_REMOTE_IRR (1u << 14)
#define RTE_ACTIVE_LOW (1u << 13)
#define RTE_DELIVS (1u << 12)
#define RTE_LOGICAL (1u << 11)
#define RTE_MASKED (1u << 16)
/* PC test device: ISA IRQ line n follows an 8-bit write to port 0x2000 + n */
static inline void set_irq_line(int line, int level) { outb(level, 0x2000 + line); }

/* ---------------------------------------------------------------- fw_cfg, multiboot */

u64 fwcfg_read(u16 key, int size);
#define FW_CFG_RAM_SIZE 0x03
#define FW_CFG_NB_CPUS 0x05
extern u32 mb_info;

/* ---------------------------------------------------------------- SMP */

extern u32 nr_cpus;               /* fw_cfg's CPU count */
extern u32 cpu_ids[MAX_CPUS];     /* APIC IDs of the CPUs that came up: [0] is the BSP,
				     the APs follow in APIC ID order (after smp_init) */
extern u32 nr_online;             /* how many of cpu_ids[] are valid */
/* INIT, SIPI, SIPI to all but self; waits for fw_cfg's count. Returns CPUs online. */
u32 smp_init(void);
void copy_trampoline(void);
#define TRAMPOLINE_ADDR 0x8000
#define SIPI_VECTOR (TRAMPOLINE_ADDR >> 12)
/* Run fn(arg) on CPU (APIC ID) id, IF=1 while it runs. on_cpu waits (up to 2 s). */
bool on_cpu(u32 id, void (*fn)(void *), void *arg);
void on_cpu_async(u32 id, void (*fn)(void *), void *arg);
bool on_cpu_wait(u32 id, u64 ms);

/* ---------------------------------------------------------------- the program */

/* Each program defines this; its return value is ignored (the summary decides). */
void test_main(void);

#endif
