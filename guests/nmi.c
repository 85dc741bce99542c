/*
 * nmi: NMIs sent through the ICR (delivery mode NMI, 0x400).
 *  - a self NMI (physical destination = own APIC ID) is taken once, also with IF=0;
 *  - NMIs are blocked from NMI delivery until IRET: one raised inside the handler is
 *    taken right after it, once; two raised inside it still give one (one can pend);
 *  - an NMI IPI reaches an AP running with IF=0; a broadcast NMI (all excluding self)
 *    wakes every halted AP once;
 *  - an NMI and then a fixed IPI sent by an AP to the BSP while the BSP is in its NMI
 *    handler; after IRET the BSP spins with IF=1 and no VM exits: both arrive, the NMI
 *    first (KVM injects a pending NMI before an interrupt;
 *    a VMM must not let a KVM_INTERRUPT vector overtake it, nor wait for an
 *    interrupt-window exit this host never sends).
 * NMI handlers never print or take locks.
 */
#include "libguest.h"
#include "expect.h"

static u32 bsp;
static volatile u64 nmi_rflags[MAX_CPUS];
static volatile int resend; /* how many NMIs the handler sends to itself on its 1st run */
static volatile u32 nested_during; /* NMIs counted while the 1st handler was still running */

static u32 nmis(u32 id) { return READ_ONCE(irq_count[id][2]); }

#define V_AFTER 0x45
static volatile u32 order_on, order_n, order_log[4];
static u32 ap;
static void log_order(u32 v)
{
	if (order_on && order_n < 4)
		order_log[order_n++] = v;
}

static void h_after(struct frame *f)
{
	(void)f;
	log_order(V_AFTER);
	apic_eoi();
}

static volatile u32 ap_sent;
static void ap_nmi_then_fixed(void *arg)
{
	(void)arg;
	apic_icr(bsp, ICR_NMI | ICR_ASSERT);
	apic_icr(bsp, ICR_FIXED | ICR_ASSERT | V_AFTER);
	ap_sent = 1;
}

static void h_nmi(struct frame *f)
{
	u32 me = smp_id();
	nmi_rflags[me] = f->rflags;
	if (me == bsp) {
		log_order(2);
		if (order_on == 1) {
			/* NMIs blocked here: the AP's NMI and fixed IPI both wait for the IRET */
			order_on = 2;
			on_cpu_async(cpu_ids[1], ap_nmi_then_fixed, NULL);
			spin_until(READ_ONCE(ap_sent), 1000);
		}
	}
	if (resend) {
		int n = resend;
		u32 before = irq_count[me][2];
		resend = 0;
		for (int i = 0; i < n; i++)
			apic_icr(me, ICR_NMI | ICR_ASSERT);
		delay_us(1000); /* VM exits: a VMM that ignored NMI blocking would inject now */
		nested_during = irq_count[me][2] - before;
	}
}

static volatile u32 ap_ready, ap_got, ap_if;
static void ap_wait_nmi_cli(void *arg)
{
	u32 me = smp_id();
	u32 before = nmis(me);

	cli();
	ap_ready = 1;
	ap_got = wait_until(nmis(me) != before, 1000);
	ap_if = (nmi_rflags[me] >> 9) & 1;
	sti();
}

void test_main(void)
{
	bsp = smp_id();
	set_handler(2, h_nmi);
	smp_init();

	u32 n0 = nmis(bsp);
	apic_icr(bsp, ICR_NMI | ICR_ASSERT);
	wait_until(nmis(bsp) >= n0 + 1, 1000);
	delay_us(2000);
	report(nmis(bsp) == n0 + 1, "self NMI through the ICR (destination = own APIC ID), once");

	n0 = nmis(bsp);
	cli();
	apic_icr(bsp, ICR_NMI | ICR_ASSERT);
	bool got = wait_until(nmis(bsp) >= n0 + 1, 1000);
	u64 fl = nmi_rflags[bsp];
	sti();
	report(got && !(fl & 0x200), "an NMI is taken while IF=0 (cli)");

	n0 = nmis(bsp);
	nested_during = 99;
	resend = 1;
	apic_icr(bsp, ICR_NMI | ICR_ASSERT);
	wait_until(nmis(bsp) >= n0 + 2, 1000);
	delay_us(2000);
	report(nested_during == 0 && nmis(bsp) == n0 + 2,
	       "an NMI sent inside the NMI handler waits for IRET, then is taken once");

	n0 = nmis(bsp);
	nested_during = 99;
	resend = 2;
	apic_icr(bsp, ICR_NMI | ICR_ASSERT);
	wait_until(nmis(bsp) >= n0 + 2, 1000);
	delay_us(2000);
	if (!report(nested_during == 0 && nmis(bsp) == n0 + 2,
		    "two NMIs sent inside the NMI handler give one more NMI after IRET"))
		info("%u NMIs in the handler, %u in all", nested_during, nmis(bsp) - n0);

	if (nr_online < 2) {
		skip("NMI IPIs to APs: one CPU (boot with --smp 2 or more)");
		return;
	}
	ap = cpu_ids[1];
	ap_ready = 0;
	ap_got = 0;
	on_cpu_async(ap, ap_wait_nmi_cli, NULL);
	spin_until(ap_ready, 1000);
	apic_icr(ap, ICR_NMI | ICR_ASSERT);
	on_cpu_wait(ap, 2000);
	report(ap_got && ap_if == 0, "NMI IPI BSP -> AP %u, taken while the AP runs with IF=0", ap);

	u32 before[MAX_CPUS];
	for (u32 i = 0; i < nr_online; i++)
		before[cpu_ids[i]] = nmis(cpu_ids[i]);
	delay_us(1000); /* let the APs go back to HLT */
	apic_icr(0, ICR_ALL_BUT_SELF | ICR_NMI | ICR_ASSERT);
	bool all = true;
	for (u32 i = 1; i < nr_online; i++)
		all &= spin_until(nmis(cpu_ids[i]) >= before[cpu_ids[i]] + 1, 1000);
	delay_us(2000);
	bool once = nmis(bsp) == before[bsp];
	for (u32 i = 1; i < nr_online; i++)
		once &= nmis(cpu_ids[i]) == before[cpu_ids[i]] + 1;
	report(all && once, "NMI broadcast (all excluding self) wakes each halted AP once");

	set_handler(V_AFTER, h_after);
	order_n = 0;
	ap_sent = 0;
	order_on = 1;
	sti();
	apic_icr(bsp, ICR_NMI | ICR_ASSERT);
	bool all3 = spin_until(READ_ONCE(order_n) >= 3, 1000); /* PAUSE only: no VM exits */
	order_on = 0;
	on_cpu_wait(ap, 1000);
	if (!report(all3 && order_log[0] == 2 && order_log[1] == 2 && order_log[2] == V_AFTER,
		    "an AP's NMI and fixed IPI sent during an NMI handler: after IRET, while "
		    "the BSP spins with IF=1, the NMI comes first, then the interrupt"))
		info("%u taken: %x %x %x", order_n, order_log[0], order_log[1], order_log[2]);
}
