/*
 * ipi: fixed IPIs in xAPIC mode (self by shorthand and by own ID, BSP->AP, AP->BSP,
 * AP->AP, all-excluding-self, all-including-self, physical broadcast 0xff, a missing
 * destination), an IPI held in IRR while IF=0; then x2APIC mode (IA32_APIC_BASE.EXTD):
 * self-IPI by ICR and by the SELF_IPI MSR, ICR2 gone, IPIs between x2APIC CPUs.
 * HLT: a self-IPI pending at STI;HLT is taken at once, an AP's IPI wakes the halted BSP.
 * Every interrupt must be taken exactly once, by exactly the addressed CPUs.
 */
#include "libguest.h"
#include "expect.h"
#include "halt.h"

static u32 bsp;

static void send_ipi(void *arg)
{
	u64 a = (u64)arg;
	apic_icr(a >> 32, (u32)a);
}
#define IPI_ARG(dest, low) ((void *)(((u64)(dest) << 32) | (low)))

static volatile int ap_x2apic_result[MAX_CPUS];
static void ap_enable_x2apic(void *arg)
{
	ap_x2apic_result[smp_id()] = enable_x2apic();
}

static void xapic_tests(void)
{
	u32 all = online_mask();
	char what[96];

	expect_begin(0x50);
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x50);
	expect_end(0x50, 1u << bsp, "xAPIC self-IPI, shorthand self");
	report(!(apic_read(APIC_ICR) & ICR_BUSY), "xAPIC ICR delivery status is idle after a send");

	expect_begin(0x51);
	apic_icr(bsp, ICR_ASSERT | 0x51);
	expect_end(0x51, 1u << bsp, "xAPIC self-IPI, physical destination = own APIC ID");

	cli();
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x52);
	delay_us(1000);
	bool pending = apic_vector_bit(APIC_IRR, 0x52) && irq_count[bsp][0x52] == 0;
	sti();
	bool taken = wait_until(irq_count[bsp][0x52] == 1, 1000);
	report(pending && taken && !apic_vector_bit(APIC_IRR, 0x52),
	       "xAPIC self-IPI with IF=0 waits in IRR, taken after STI");

	if (nr_online < 2) {
		skip("xAPIC IPIs between CPUs: one CPU (boot with --smp 2 or more)");
		return;
	}
	for (u32 i = 1; i < nr_online; i++) {
		u32 ap = cpu_ids[i];
		expect_begin(0x53);
		apic_icr(ap, ICR_ASSERT | 0x53);
		snprintf(what, sizeof(what), "xAPIC fixed IPI BSP -> AP %u", ap);
		expect_end(0x53, 1u << ap, what);

		expect_begin(0x54);
		on_cpu(ap, send_ipi, IPI_ARG(bsp, ICR_ASSERT | 0x54));
		snprintf(what, sizeof(what), "xAPIC fixed IPI AP %u -> BSP", ap);
		expect_end(0x54, 1u << bsp, what);
	}
	if (nr_online >= 3) {
		u32 a = cpu_ids[1], b = cpu_ids[2];
		expect_begin(0x55);
		on_cpu(a, send_ipi, IPI_ARG(b, ICR_ASSERT | 0x55));
		snprintf(what, sizeof(what), "xAPIC fixed IPI AP %u -> AP %u", a, b);
		expect_end(0x55, 1u << b, what);
	} else {
		skip("xAPIC fixed IPI AP -> AP: needs 3 CPUs");
	}

	expect_begin(0x56);
	apic_icr(0, ICR_ALL_BUT_SELF | ICR_ASSERT | 0x56);
	expect_end(0x56, all & ~(1u << bsp), "xAPIC broadcast, all excluding self");

	expect_begin(0x57);
	apic_icr(0, ICR_ALL | ICR_ASSERT | 0x57);
	expect_end(0x57, all, "xAPIC broadcast, all including self");

	expect_begin(0x58);
	apic_icr(0xff, ICR_ASSERT | 0x58);
	expect_end(0x58, all, "xAPIC physical destination 0xff is a broadcast");

	expect_begin(0x59);
	on_cpu(cpu_ids[1], send_ipi, IPI_ARG(0, ICR_ALL_BUT_SELF | ICR_ASSERT | 0x59));
	snprintf(what, sizeof(what), "xAPIC broadcast all excluding self, sent by AP %u",
		 cpu_ids[1]);
	expect_end(0x59, all & ~(1u << cpu_ids[1]), what);

	expect_begin(0x5a);
	apic_icr(0x0e, ICR_ASSERT | 0x5a);
	expect_end(0x5a, 0, "xAPIC IPI to an absent APIC ID (0x0e) reaches nobody");
}

static u32 halt_vec;
static bool got_halt_vec(void) { return irq_count[bsp][halt_vec] >= 1; }

static void ipi_after_2ms(void *arg)
{
	delay_us(2000);
	apic_icr(bsp, ICR_ASSERT | (u32)(u64)arg);
}

/*
 * An interrupt that becomes deliverable while IF=0 must be taken once IF=1 again, also
 * if the CPU then only spins (PAUSE, no VM exits): here the handler of 0x5c sends 0x5d
 * and returns, and IRET is what opens the window (a userspace irqchip depends on an
 * interrupt-window exit, or on polling for one where the host sends none: H6).
 */
static void h_window(struct frame *f)
{
	(void)f;
	apic_eoi();
	apic_icr(bsp, ICR_ASSERT | 0x5d);
}

static void window_tests(void)
{
	set_handler(0x5c, h_window);
	u32 n0 = irq_count[bsp][0x5d];
	apic_icr(bsp, ICR_ASSERT | 0x5c);
	bool got = spin_until(READ_ONCE(irq_count[bsp][0x5d]) != n0, 500);
	report(got, "an IPI sent inside a handler is taken after its IRET by a CPU spinning "
	       "without exits");
}

static void halt_tests(void)
{
	int r;

	if (halt_rescuer() == ~0u) {
		skip("IPIs and HLT: needs a second CPU as watchdog (--smp 2)");
		return;
	}
	halt_vec = 0x5b;
	cli();
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x5b);
	r = halt_wait(got_halt_vec, 300, 1000);
	if (!report(r == 0, "STI;HLT with a self-IPI pending takes it and does not stay halted"))
		info("halt_wait: %d", r);

	if (nr_online < 3) {
		skip("an AP's IPI waking the halted BSP: needs 3 CPUs (one is the watchdog)");
		return;
	}
	halt_vec = 0x5c;
	on_cpu_async(cpu_ids[1], ipi_after_2ms, (void *)0x5cul);
	r = halt_wait(got_halt_vec, 300, 1000);
	on_cpu_wait(cpu_ids[1], 1000);
	if (!report(r == 0, "a fixed IPI from AP %u wakes the halted BSP", cpu_ids[1]))
		info("halt_wait: %d", r);
}

static void x2apic_tests(void)
{
	u32 all = online_mask();
	char what[96];
	u64 v;

	if (!cpu_has_x2apic()) {
		u64 base = rdmsr(MSR_IA32_APICBASE);
		int r = wrmsr_safe(MSR_IA32_APICBASE, base | APICBASE_EXTD);
		report(r == 13 && !(rdmsr(MSR_IA32_APICBASE) & APICBASE_EXTD),
		       "no x2APIC in CPUID: setting IA32_APIC_BASE.EXTD raises #GP");
		skip("x2APIC IPIs: CPUID.1:ECX[21] (x2APIC) is clear");
		return;
	}
	int r = enable_x2apic();
	u64 base = rdmsr(MSR_IA32_APICBASE);
	info("IA32_APIC_BASE %lx, x2APIC ID %lx", base, rdmsr(0x802));
	if (!report(r == 0 && (base & (APICBASE_EN | APICBASE_EXTD)) == (APICBASE_EN | APICBASE_EXTD),
		    "x2APIC enabled through IA32_APIC_BASE (EN|EXTD)"))
		return;
	report(rdmsr(0x802) == bsp, "x2APIC ID MSR 0x802 == initial APIC ID");
	report(rdmsr_safe(0x831, &v) == 13, "x2APIC: MSR 0x831 (xAPIC ICR2) does not exist (#GP)");

	expect_begin(0x60);
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x60);
	expect_end(0x60, 1u << bsp, "x2APIC self-IPI, ICR shorthand self");

	expect_begin(0x61);
	apic_icr(bsp, ICR_ASSERT | 0x61);
	expect_end(0x61, 1u << bsp, "x2APIC self-IPI, ICR physical destination = own x2APIC ID");

	expect_begin(0x62);
	wrmsr(0x83f, 0x62);
	expect_end(0x62, 1u << bsp, "x2APIC SELF_IPI MSR 0x83f");

	if (nr_online < 2) {
		skip("x2APIC IPIs between CPUs: one CPU (boot with --smp 2 or more)");
		return;
	}
	for (u32 i = 1; i < nr_online; i++) {
		u32 ap = cpu_ids[i];
		ap_x2apic_result[ap] = -1;
		on_cpu(ap, ap_enable_x2apic, NULL);
		report(ap_x2apic_result[ap] == 0, "AP %u switches to x2APIC mode", ap);

		expect_begin(0x63);
		apic_icr(ap, ICR_ASSERT | 0x63);
		snprintf(what, sizeof(what), "x2APIC fixed IPI BSP -> AP %u", ap);
		expect_end(0x63, 1u << ap, what);

		expect_begin(0x64);
		on_cpu(ap, send_ipi, IPI_ARG(bsp, ICR_ASSERT | 0x64));
		snprintf(what, sizeof(what), "x2APIC fixed IPI AP %u -> BSP", ap);
		expect_end(0x64, 1u << bsp, what);
	}
	expect_begin(0x65);
	apic_icr(0, ICR_ALL_BUT_SELF | ICR_ASSERT | 0x65);
	expect_end(0x65, all & ~(1u << bsp), "x2APIC broadcast, all excluding self");

	expect_begin(0x66);
	apic_icr(0xffffffff, ICR_ASSERT | 0x66);
	expect_end(0x66, all, "x2APIC physical destination 0xffffffff is a broadcast");
}

/*
 * Two xAPIC IDs aliased: AP 1 takes the BSP's APIC ID. Architecturally a physical IPI
 * then reaches both (KVM: the aliased ID disables the optimized map and the slow path
 * delivers to every match). A VMM that enabled KVM_X2APIC_API_USE_32BIT_IDS -- which
 * `apicv boot` and QEMU do only when the guest has x2APIC -- gets KVM's quirk instead:
 * the map keeps the first vCPU with the ID, so only the BSP takes it.
 */
#define V_ALIAS 0x5a
static volatile u32 alias_seen[MAX_CPUS];
static void h_alias(struct frame *f)
{
	(void)f;
	if (smp_id() != bsp && (apic_read(APIC_ID) >> 24) != smp_id())
		apic_write(APIC_ID, smp_id() << 24); /* an AP takes its own ID back */
	alias_seen[smp_id()]++;
	apic_eoi();
}

static void set_xapic_id(void *id) { apic_write(APIC_ID, (u32)(u64)id << 24); }

static void aliased_tests(void)
{
	if (nr_online < 2) {
		skip("aliased xAPIC IDs [needs 2 CPUs]");
		return;
	}
	u32 ap = cpu_ids[1];
	bool quirk = cpu_has_x2apic();

	set_handler(V_ALIAS, h_alias);
	on_cpu(ap, set_xapic_id, (void *)(u64)bsp);
	expect_begin(V_ALIAS);
	apic_icr(bsp, ICR_ASSERT | V_ALIAS);
	expect_end(V_ALIAS, quirk ? 1u << bsp : (1u << bsp) | (1u << ap),
		   quirk ? "AP 1 aliased to the BSP's xAPIC ID: a physical IPI reaches only the "
			   "BSP (KVM_X2APIC_API_USE_32BIT_IDS)"
			 : "AP 1 aliased to the BSP's xAPIC ID: a physical IPI reaches both");
	/* the quirk left AP 1 with the BSP's ID: a shorthand reaches it to take its own back */
	u32 seen = READ_ONCE(alias_seen[ap]);
	apic_icr(0, ICR_ALL_BUT_SELF | ICR_ASSERT | V_ALIAS);
	wait_until(READ_ONCE(alias_seen[ap]) != seen, 1000);
	expect_begin(0x5b);
	apic_icr(ap, ICR_ASSERT | 0x5b);
	expect_end(0x5b, 1u << ap, "AP 1 back at its own xAPIC ID");
}

void test_main(void)
{
	bsp = smp_id();
	smp_init();
	report(nr_online == nr_cpus, "%u of %u CPUs online", nr_online, nr_cpus);
	xapic_tests();
	aliased_tests();
	window_tests();
	halt_tests();
	x2apic_tests();
}
