/* IDT and dispatch, exception fixups, spinlocks, memory helpers, time, fw_cfg. */
#include "libguest.h"

struct idt_entry {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
};

static struct idt_entry idt[256] __attribute__((aligned(16)));
static handler_t handlers[256];
volatile u32 irq_count[MAX_CPUS][256];
struct percpu percpu[MAX_CPUS];
extern char isr_stubs[];

struct extable_entry {
	u64 insn, fixup;
};
extern struct extable_entry __extable_start[], __extable_end[];

void idt_init(void)
{
	for (int v = 0; v < 256; v++) {
		u64 a = (u64)isr_stubs + 16 * v;
		idt[v] = (struct idt_entry){
			.off0 = a, .sel = 0x08, .ist = 0, .type = 0x8e, /* present interrupt gate */
			.off1 = a >> 16, .off2 = a >> 32, .zero = 0,
		};
	}
}

void load_idt(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = { sizeof(idt) - 1, (u64)idt };
	asm volatile("lidt %0" :: "m"(d));
}

void set_handler(int vector, handler_t h)
{
	handlers[vector] = h;
}

void irq_dispatch(struct frame *f)
{
	struct percpu *p = this_cpu();
	u32 v = f->vector;

	if (p->id < MAX_CPUS)
		irq_count[p->id][v]++;
	if (v < 32 && v != 2) {
		for (struct extable_entry *e = __extable_start; e < __extable_end; e++) {
			if (e->insn == f->rip) {
				f->rip = e->fixup;
				p->fault_vector = v;
				return;
			}
		}
		if (handlers[v]) {
			handlers[v](f);
			return;
		}
		abort_test("unexpected exception %u on CPU %u at rip %lx, error code %lx", v, p->id,
			   f->rip, f->error);
	}
	if (handlers[v])
		handlers[v](f);
	else if (v != 2 && v != SPURIOUS_VECTOR)
		apic_eoi();
}

int rdmsr_safe(u32 msr, u64 *v)
{
	u32 lo = 0, hi = 0;

	this_cpu()->fault_vector = 0;
	asm volatile("1: rdmsr\n2:\n"
		     ".pushsection .extable, \"a\"\n.quad 1b, 2b\n.popsection"
		     : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
	*v = ((u64)hi << 32) | lo;
	return this_cpu()->fault_vector;
}

int wrmsr_safe(u32 msr, u64 v)
{
	this_cpu()->fault_vector = 0;
	asm volatile("1: wrmsr\n2:\n"
		     ".pushsection .extable, \"a\"\n.quad 1b, 2b\n.popsection"
		     :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
	return this_cpu()->fault_vector;
}

void spin_lock(spinlock_t *l)
{
	u32 one = 1;
	for (;;) {
		u32 old = one;
		asm volatile("xchgl %0, %1" : "+r"(old), "+m"(l->v) :: "memory");
		if (!old)
			return;
		while (l->v)
			cpu_relax();
	}
}

void spin_unlock(spinlock_t *l)
{
	barrier();
	l->v = 0;
}

void *memset(void *d, int c, u64 n)
{
	u8 *p = d;
	while (n--)
		*p++ = c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, u64 n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p < *q ? -1 : 1;
	return 0;
}

u64 strlen(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

/* ---------------------------------------------------------------- time */

u64 tsc_khz = 3000000;
bool tsc_khz_known;

struct pvclock_time_info {
	u32 version, pad0;
	u64 tsc_timestamp, system_time;
	u32 tsc_to_system_mul;
	s8 tsc_shift;
	u8 flags, pad[2];
} __attribute__((aligned(64)));

static struct pvclock_time_info pvclock;
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01

/*
 * The TSC frequency from kvmclock: KVM fills tsc_to_system_mul/tsc_shift (ns per TSC
 * cycle scaled by 2^32) once the guest enables the clock. KVM handles this MSR itself,
 * whatever the irqchip; if it refuses, keep the 3 GHz guess (waits just last longer).
 */
void tsc_calibrate(void)
{
	if (wrmsr_safe(MSR_KVM_SYSTEM_TIME_NEW, (u64)&pvclock | 1))
		return;
	for (int i = 0; i < 1000 && !READ_ONCE(pvclock.tsc_to_system_mul); i++)
		io_delay();
	wrmsr_safe(MSR_KVM_SYSTEM_TIME_NEW, 0);
	u32 mul = READ_ONCE(pvclock.tsc_to_system_mul);
	s8 shift = READ_ONCE(pvclock.tsc_shift);
	if (!mul)
		return;
	u64 khz = (1000000ul << 32) / mul;
	if (shift > 0)
		khz >>= shift;
	else if (shift < 0)
		khz <<= -shift;
	if (khz < 100000 || khz > 20000000)
		return;
	tsc_khz = khz;
	tsc_khz_known = true;
}

void delay_us(u64 us)
{
	u64 end = rdtsc() + us_to_tsc(us);
	while (rdtsc() < end)
		io_delay();
}

void spin_delay_us(u64 us)
{
	u64 end = rdtsc() + us_to_tsc(us);
	while (rdtsc() < end)
		cpu_relax();
}

/* ---------------------------------------------------------------- fw_cfg */

u64 fwcfg_read(u16 key, int size)
{
	u64 v = 0;
	outw(key, 0x510);
	for (int i = 0; i < size; i++)
		v |= (u64)inb(0x511) << (8 * i);
	return v;
}
