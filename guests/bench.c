/*
 * bench: the guest `make bench` boots to measure how fast an interrupt controller serves a
 * real guest (not a test program: its checks only say every phase ran to completion).
 *   self_ipi  - N_SELF fixed self-IPIs, each sent by the handler of the previous one;
 *   ping_pong - N_PP round trips BSP -> AP 1 -> BSP of fixed IPIs, each sent by a handler;
 *   timer     - a 1 kHz periodic LVT timer on the BSP and on AP 1 for TIMER_MS, both halted
 *               between ticks.
 * Each phase is framed by OUTs of its number to port 0xe0 (start) and 0x80 | number (end),
 * which the host timestamps; the guest prints "BENCH: <phase> <interrupts> <us>" lines.
 */
#include "libguest.h"

#define N_SELF 20000
#define N_PP 10000
#define TIMER_MS 500
#define V_SELF 0x50
#define V_PING 0x51
#define V_PONG 0x52
#define V_TIMER 0xe1
#define MARK_PORT 0xe0

static u32 bsp, ap;
static volatile u32 self_left, pp_left, timer_stop;

static void mark(u32 v) { outl(v, MARK_PORT); }

static void h_self(struct frame *f)
{
	(void)f;
	apic_eoi();
	if (self_left) {
		self_left--;
		apic_icr(bsp, ICR_FIXED | ICR_ASSERT | V_SELF);
	}
}

static void h_ping(struct frame *f)
{
	(void)f;
	apic_eoi();
	apic_icr(bsp, ICR_FIXED | ICR_ASSERT | V_PONG);
}

static void h_pong(struct frame *f)
{
	(void)f;
	apic_eoi();
	if (pp_left) {
		pp_left--;
		apic_icr(ap, ICR_FIXED | ICR_ASSERT | V_PING);
	}
}

static void timer_start(void)
{
	apic_write(APIC_TDCR, 0xb); /* divide by 1: 1 ns per count */
	apic_write(APIC_LVTT, V_TIMER | LVT_TIMER_PERIODIC);
	apic_write(APIC_TMICT, 1000000);
}

static void ap_timer(void *arg)
{
	(void)arg;
	timer_start();
	while (!READ_ONCE(timer_stop))
		sti_hlt();
	apic_write(APIC_TMICT, 0);
}

static void report_phase(const char *name, u32 phase, u32 n, u64 t0)
{
	u64 us = tsc_to_us(rdtsc() - t0);
	mark(0x80 | phase);
	printf("BENCH: %s %u %lu\n", name, n, us);
}

void test_main(void)
{
	bsp = smp_id();
	set_handler(V_SELF, h_self);
	set_handler(V_PING, h_ping);
	set_handler(V_PONG, h_pong);
	set_handler(V_TIMER, NULL);
	smp_init();
	if (nr_online < 2) {
		skip("bench needs --smp 2");
		return;
	}
	ap = cpu_ids[1];

	/* self-IPIs */
	cli();
	self_left = N_SELF - 1;
	u32 c0 = irq_count[bsp][V_SELF];
	mark(1);
	u64 t0 = rdtsc();
	apic_icr(bsp, ICR_FIXED | ICR_ASSERT | V_SELF);
	while (READ_ONCE(self_left) || irq_count[bsp][V_SELF] - c0 < N_SELF)
		sti_hlt(), cli();
	report_phase("self_ipi", 1, irq_count[bsp][V_SELF] - c0, t0);
	report(irq_count[bsp][V_SELF] - c0 == N_SELF, "self_ipi: %u self-IPIs taken", N_SELF);

	/* ping-pong BSP <-> AP */
	pp_left = N_PP - 1;
	c0 = irq_count[bsp][V_PONG];
	mark(2);
	t0 = rdtsc();
	apic_icr(ap, ICR_FIXED | ICR_ASSERT | V_PING);
	while (READ_ONCE(pp_left) || irq_count[bsp][V_PONG] - c0 < N_PP)
		sti_hlt(), cli();
	report_phase("ping_pong", 2, 2 * (irq_count[bsp][V_PONG] - c0), t0);
	report(irq_count[bsp][V_PONG] - c0 == N_PP, "ping_pong: %u round trips", N_PP);

	/* 1 kHz timers on two vCPUs */
	u32 b0 = irq_count[bsp][V_TIMER], a0 = irq_count[ap][V_TIMER];
	timer_stop = 0;
	mark(3);
	t0 = rdtsc();
	on_cpu_async(ap, ap_timer, NULL);
	timer_start();
	u64 end = t0 + ms_to_tsc(TIMER_MS);
	while (rdtsc() < end)
		sti_hlt(), cli();
	apic_write(APIC_TMICT, 0);
	WRITE_ONCE(timer_stop, 1);
	apic_icr(ap, ICR_FIXED | ICR_ASSERT | V_PING); /* wake it to see timer_stop */
	on_cpu_wait(ap, 1000);
	u32 ticks = (irq_count[bsp][V_TIMER] - b0) + (irq_count[ap][V_TIMER] - a0);
	report_phase("timer", 3, ticks, t0);
	report(ticks >= TIMER_MS, "timer: %u ticks on 2 vCPUs in %u ms", ticks, TIMER_MS);
	sti();
}
