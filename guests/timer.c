/*
 * timer: the LVT timer and the TSC-deadline timer. KVM's APIC timer counts 1 ns per
 * bus cycle (divide-by-1 TMICT 1,000,000 = 1 ms).
 *  - one-shot: TMCCT counts down from TMICT, one interrupt, then TMCCT stays 0; not
 *    before TMICT ns; masked it counts down silently; TMICT = 0 stops it; TDCR divides;
 *  - periodic: fires again and again, TMCCT reloads, TMICT = 0 stops it;
 *  - TSC-deadline (CPUID.1:ECX[24]): entering the mode clears TMICT (KVM) and TMICT writes
 *    are ignored; a deadline fires once, not before the deadline, then MSR 0x6e0 reads 0;
 *    a deadline in the past fires at once; writing 0 disarms; re-arming replaces; masked
 *    it expires without an interrupt and (KVM) the MSR keeps the deadline.
 *  - each kind of timer wakes a CPU waiting in HLT (another CPU stands by to rescue it).
 * Guest time spent waiting on timers: about 0.2 s.
 */
#include "libguest.h"
#include "halt.h"

#define TV 0xe0
static u32 bsp;
static volatile u64 fire_tsc[8];

static u32 count(void) { return READ_ONCE(irq_count[bsp][TV]); }

static void h_timer(struct frame *f)
{
	u32 n = irq_count[bsp][TV]; /* already counted */
	if (n >= 1 && n <= ARRAY_SIZE(fire_tsc))
		fire_tsc[n - 1] = rdtsc();
	apic_eoi();
}

static void reset_count(void)
{
	irq_count[bsp][TV] = 0;
	for (u32 i = 0; i < ARRAY_SIZE(fire_tsc); i++)
		fire_tsc[i] = 0;
}

/* a timing check needs a known TSC rate; elapsed TSC must cover at least 99% of ns */
static void check_not_early(u64 t0, u64 t1, u64 ns, const char *what)
{
	if (!tsc_khz_known) {
		skip("%s [TSC frequency unknown]", what);
		return;
	}
	u64 us = tsc_to_us(t1 - t0);
	if (!report(us * 1000 >= ns * 99 / 100, "%s", what))
		info("%s: %lu us elapsed, expected %lu us", what, us, ns / 1000);
}

static void one_shot(void)
{
	apic_write(APIC_TDCR, 0xb); /* divide by 1 */
	apic_write(APIC_LVTT, TV | LVT_TIMER_ONESHOT);
	reset_count();
	u64 t0 = rdtsc();
	apic_write(APIC_TMICT, 20000000); /* 20 ms */
	u32 c1 = apic_read(APIC_TMCCT);
	delay_us(1000);
	u32 c2 = apic_read(APIC_TMCCT);
	if (!report(c1 <= 20000000 && c2 < c1 && c2 > 0,
		    "one-shot: TMCCT counts down from TMICT"))
		info("TMCCT %u then %u", c1, c2);
	bool fired = wait_until(count() >= 1, 500);
	report(fired, "one-shot: the timer interrupt arrives");
	if (fired)
		check_not_early(t0, fire_tsc[0], 20000000, "one-shot: not before TMICT ns (20 ms)");
	delay_us(5000);
	u32 c3 = apic_read(APIC_TMCCT);
	report(count() == 1 && c3 == 0, "one-shot: exactly one interrupt, then TMCCT stays 0");
	report(apic_read(APIC_TMICT) == 20000000, "one-shot: TMICT keeps its value after expiry");

	apic_write(APIC_LVTT, TV | LVT_MASKED);
	reset_count();
	apic_write(APIC_TMICT, 1000000);
	delay_us(3000);
	report(count() == 0 && apic_read(APIC_TMCCT) == 0,
	       "masked one-shot counts down to 0 without an interrupt");
	apic_write(APIC_TMICT, 0); /* drop the expiry KVM keeps pending while masked */
	apic_write(APIC_LVTT, TV);

	reset_count();
	apic_write(APIC_TMICT, 20000000);
	apic_write(APIC_TMICT, 0);
	u32 c4 = apic_read(APIC_TMCCT);
	delay_us(25000);
	report(c4 == 0 && count() == 0, "writing TMICT = 0 stops a running one-shot");

	apic_write(APIC_TDCR, 0x0); /* divide by 2 */
	reset_count();
	t0 = rdtsc();
	apic_write(APIC_TMICT, 2000000); /* 4 ms */
	fired = wait_until(count() >= 1, 500);
	report(fired, "one-shot with TDCR divide-by-2 fires");
	if (fired)
		check_not_early(t0, fire_tsc[0], 4000000,
				"divide-by-2: TMICT 2,000,000 takes 4 ms");
	apic_write(APIC_TDCR, 0xb);
}

static void periodic(void)
{
	apic_write(APIC_LVTT, TV | LVT_TIMER_PERIODIC);
	reset_count();
	u64 t0 = rdtsc();
	apic_write(APIC_TMICT, 2000000); /* 2 ms */
	bool fired = wait_until(count() >= 3, 500);
	u32 c = apic_read(APIC_TMCCT);
	report(fired, "periodic: at least 3 interrupts");
	if (!report(c > 0 && c <= 2000000, "periodic: TMCCT reloads (0 < TMCCT <= TMICT)"))
		info("TMCCT %u", c);
	if (fired)
		check_not_early(t0, fire_tsc[2], 6000000, "periodic: 3 periods take 6 ms or more");
	apic_write(APIC_TMICT, 0);
	u32 n = count();
	c = apic_read(APIC_TMCCT);
	delay_us(6000);
	report(c == 0 && count() <= n + 1, "writing TMICT = 0 stops the periodic timer");
	apic_write(APIC_LVTT, TV | LVT_MASKED);
}

static void tsc_deadline(void)
{
	u64 d, t0;

	if (!cpu_has_tsc_deadline()) {
		skip("TSC-deadline timer: CPUID.1:ECX[24] is clear");
		return;
	}
	apic_write(APIC_LVTT, TV | LVT_TIMER_ONESHOT);
	apic_write(APIC_TMICT, 50000000);
	apic_write(APIC_LVTT, TV | LVT_TIMER_TSCDEADLINE);
	reset_count();
	report(apic_read(APIC_LVTT) == (TV | LVT_TIMER_TSCDEADLINE),
	       "LVTT accepts TSC-deadline mode (bits 18:17 = 2)");
	report(apic_read(APIC_TMICT) == 0, "entering TSC-deadline mode clears TMICT (KVM)");
	apic_write(APIC_TMICT, 1000);
	delay_us(1000);
	report(apic_read(APIC_TMICT) == 0 && apic_read(APIC_TMCCT) == 0 && count() == 0,
	       "TSC-deadline mode: TMICT writes are ignored, TMCCT reads 0");

	reset_count();
	d = rdtsc() + us_to_tsc(10000);
	wrmsr(MSR_TSC_DEADLINE, d);
	report(rdmsr(MSR_TSC_DEADLINE) == d && count() == 0,
	       "armed: MSR 0x6e0 reads back the deadline");
	bool fired = wait_until(count() >= 1, 500);
	report(fired, "TSC-deadline: the interrupt arrives");
	if (fired) {
		if (!tsc_khz_known || fire_tsc[0] >= d)
			pass("TSC-deadline: not taken before the deadline");
		else
			fail("TSC-deadline: not taken before the deadline");
	}
	delay_us(3000);
	report(count() == 1 && rdmsr(MSR_TSC_DEADLINE) == 0,
	       "TSC-deadline: exactly one interrupt, then MSR 0x6e0 reads 0");

	reset_count();
	wrmsr(MSR_TSC_DEADLINE, 1);
	u32 at_once = count();
	report(wait_until(count() >= 1, 50), "a deadline in the past fires at once");
	info("past deadline %s taken right after the WRMSR", at_once ? "was" : "was not");

	reset_count();
	wrmsr(MSR_TSC_DEADLINE, rdtsc() + us_to_tsc(20000));
	wrmsr(MSR_TSC_DEADLINE, 0);
	delay_us(25000);
	report(count() == 0 && rdmsr(MSR_TSC_DEADLINE) == 0, "writing 0 disarms the deadline");

	reset_count();
	t0 = rdtsc();
	wrmsr(MSR_TSC_DEADLINE, t0 + us_to_tsc(30000));
	wrmsr(MSR_TSC_DEADLINE, rdtsc() + us_to_tsc(1000));
	fired = wait_until(count() >= 1, 200);
	while (rdtsc() < t0 + us_to_tsc(40000)) /* well past the replaced 30 ms deadline */
		io_delay();
	report(fired && count() == 1, "re-arming replaces the deadline (1 ms fires, 30 ms never)");

	/* the deadline is compared with the guest's TSC, also after the guest moved it */
	reset_count();
	t0 = rdtsc();
	wrmsr(MSR_IA32_TSC, t0 + ms_to_tsc(5000));
	d = rdtsc() + us_to_tsc(5000);
	bool moved = d - us_to_tsc(5000) - t0 >= ms_to_tsc(4000);
	wrmsr(MSR_TSC_DEADLINE, d);
	fired = wait_until(count() >= 1, 200);
	report_unless(moved ? NULL : "this host ignores a guest WRMSR to IA32_TSC",
		      fired && (!tsc_khz_known || fire_tsc[0] >= d),
		      "after a WRMSR to IA32_TSC, a deadline 5 ms ahead fires on time, not early");

	apic_write(APIC_LVTT, TV | LVT_MASKED | LVT_TIMER_TSCDEADLINE);
	reset_count();
	d = rdtsc() + us_to_tsc(1000);
	wrmsr(MSR_TSC_DEADLINE, d);
	delay_us(4000);
	u64 msr = rdmsr(MSR_TSC_DEADLINE);
	report(count() == 0, "masked TSC-deadline timer expires without an interrupt");
	if (!report(msr == d, "masked: MSR 0x6e0 keeps the deadline (KVM clears it on delivery)"))
		info("MSR 0x6e0 %lx, deadline was %lx", msr, d);
	wrmsr(MSR_TSC_DEADLINE, 0);
	apic_write(APIC_LVTT, TV | LVT_MASKED);
}

static bool fired1(void) { return count() >= 1; }
static bool fired3(void) { return count() >= 3; }

static void halted(void)
{
	int r;

	if (halt_rescuer() == ~0u) {
		skip("timers waking a halted CPU: needs a second CPU as watchdog (--smp 2)");
		return;
	}
	apic_write(APIC_TDCR, 0xb);
	apic_write(APIC_LVTT, TV | LVT_TIMER_ONESHOT);
	reset_count();
	apic_write(APIC_TMICT, 5000000);
	r = halt_wait(fired1, 300, 1000);
	if (!report(r == 0, "one-shot timer wakes the CPU from HLT"))
		info("halt_wait: %d", r);

	apic_write(APIC_LVTT, TV | LVT_TIMER_PERIODIC);
	reset_count();
	apic_write(APIC_TMICT, 2000000);
	r = halt_wait(fired3, 300, 1000);
	apic_write(APIC_TMICT, 0);
	if (!report(r == 0, "periodic timer wakes the CPU from HLT three times"))
		info("halt_wait: %d", r);

	if (!cpu_has_tsc_deadline()) {
		skip("TSC-deadline timer waking a halted CPU: CPUID.1:ECX[24] is clear");
	} else {
		apic_write(APIC_LVTT, TV | LVT_TIMER_TSCDEADLINE);
		reset_count();
		wrmsr(MSR_TSC_DEADLINE, rdtsc() + us_to_tsc(3000));
		r = halt_wait(fired1, 300, 1000);
		if (!report(r == 0, "TSC-deadline timer wakes the CPU from HLT"))
			info("halt_wait: %d", r);
	}
	apic_write(APIC_LVTT, TV | LVT_MASKED);
}

void test_main(void)
{
	bsp = smp_id();
	set_handler(TV, h_timer);
	smp_init();
	one_shot();
	periodic();
	tsc_deadline();
	halted();
}
