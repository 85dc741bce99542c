/*
 * halt_wait: wait for an interrupt in HLT (IF=1), the way an idle OS does, without the
 * risk of hanging: an AP acts as watchdog and sends RESCUE_VECTOR every rescue_ms while
 * the BSP is still waiting, so the BSP wakes up to re-check its condition and its time
 * limit. A VMM that wakes a halted vCPU correctly never needs a rescue.
 */
#include "libguest.h"
#include "halt.h"

static volatile u32 waiting, rescues;
static volatile u64 rescue_cycles;
static volatile u32 waiter;

static void watchdog(void *arg)
{
	u64 next = rdtsc() + rescue_cycles;

	while (READ_ONCE(waiting)) {
		if (rdtsc() >= next) {
			rescues++;
			apic_icr(waiter, ICR_FIXED | ICR_ASSERT | RESCUE_VECTOR);
			next = rdtsc() + rescue_cycles;
		}
		cpu_relax();
	}
}

/* the last AP in cpu_ids[] (so cpu_ids[1] stays free for a test when there are 3 CPUs) */
u32 halt_rescuer(void)
{
	for (u32 i = nr_online; i-- > 1;)
		if (cpu_ids[i] != smp_id())
			return cpu_ids[i];
	return ~0u;
}

int halt_wait(bool (*cond)(void), u64 rescue_ms, u64 limit_ms)
{
	u32 ap = halt_rescuer();
	u64 end = rdtsc() + ms_to_tsc(limit_ms);

	if (ap == ~0u)
		return -1;
	rescues = 0;
	rescue_cycles = ms_to_tsc(rescue_ms);
	waiter = smp_id();
	waiting = 1;
	on_cpu_async(ap, watchdog, NULL);
	for (;;) {
		cli();
		if (cond() || rdtsc() >= end)
			break;
		sti_hlt();
	}
	sti();
	waiting = 0;
	on_cpu_wait(ap, 1000);
	return cond() ? (int)rescues : -2;
}
