/*
 * smp: INIT-SIPI-SIPI brings up every CPU fw_cfg reports; each AP's APIC ID from CPUID
 * and from the APIC ID register agree and are distinct; an AP sent INIT again waits for
 * a SIPI (ignoring fixed IPIs meanwhile) and a SIPI restarts it through the trampoline.
 */
#include "libguest.h"

#define PROBE_VECTOR 0x41

static volatile u32 seen_id[MAX_CPUS], seen_lvr[MAX_CPUS];

static void whoami(void *arg)
{
	u32 me = smp_id();

	seen_id[me] = apic_id();
	seen_lvr[me] = apic_read(APIC_LVR);
}

void test_main(void)
{
	u32 bsp = smp_id();
	struct percpu *b = &percpu[bsp];

	info("BSP: APIC ID register %u, IA32_APIC_BASE %lx, SPIV at reset %x", b->apic_id_reg,
	     b->apic_base_msr, b->spiv_at_boot);
	report(b->apic_id_reg == bsp, "BSP: APIC ID register == CPUID.1:EBX[31:24]");
	report((b->apic_base_msr & (APICBASE_EN | APICBASE_BSP)) == (APICBASE_EN | APICBASE_BSP) &&
		       (b->apic_base_msr & 0xfffff000) == APIC_MMIO,
	       "BSP: IA32_APIC_BASE = 0xfee00000 | EN | BSP");
	report(b->spiv_at_boot == 0xff, "BSP: SPIV at reset is 0xff (software disabled)");
	whoami(NULL);
	if (nr_cpus < 2) {
		skip("AP bring-up: fw_cfg reports one CPU (boot with --smp 2 or more)");
		return;
	}

	u64 t0 = rdtsc();
	u32 n = smp_init();
	info("%u CPUs online after %lu us", n, tsc_to_us(rdtsc() - t0));
	report(n == nr_cpus, "INIT-SIPI-SIPI (all excluding self) brings up all %u CPUs", nr_cpus);

	bool distinct = true;
	for (u32 i = 0; i < n; i++)
		for (u32 j = i + 1; j < n; j++)
			if (cpu_ids[i] == cpu_ids[j])
				distinct = false;
	report(distinct, "the initial APIC IDs of the %u CPUs are distinct", n);

	/* facts each AP recorded as it came up, listed in APIC ID order */
	for (u32 id = 0; id < MAX_CPUS; id++) {
		struct percpu *p = &percpu[id];
		if (id == bsp || !p->boots)
			continue;
		seen_id[id] = ~0u;
		on_cpu(id, whoami, NULL);
		info("AP %u: APIC ID register %u, IA32_APIC_BASE %lx, SPIV at boot %x, LVR %x", id,
		     p->apic_id_reg, p->apic_base_msr, p->spiv_at_boot, seen_lvr[id]);
		report(p->apic_id_reg == id, "AP %u: APIC ID register == CPUID initial APIC ID", id);
		report((p->apic_base_msr & (APICBASE_EN | APICBASE_BSP)) == APICBASE_EN,
		       "AP %u: IA32_APIC_BASE has EN set and BSP clear", id);
		report(p->spiv_at_boot == 0xff, "AP %u: SPIV after INIT is 0xff", id);
		report(seen_id[id] == id, "AP %u runs code on request and reads its own APIC ID", id);
		report(seen_lvr[id] == seen_lvr[bsp], "AP %u: APIC version register == BSP's", id);
	}
	if (n < 2)
		return;

	/* INIT again, a fixed IPI that must be ignored, then a SIPI restarts it. */
	u32 t = cpu_ids[1];
	for (u32 i = 1; i < n; i++)
		if (cpu_ids[i] > t)
			t = cpu_ids[i];
	struct percpu *p = &percpu[t];
	u32 boots = p->boots;

	p->online = 0;
	apic_icr(t, ICR_INIT | ICR_ASSERT);
	spin_delay_us(5000);
	apic_icr(t, ICR_FIXED | ICR_ASSERT | PROBE_VECTOR);
	spin_delay_us(5000);
	report(READ_ONCE(p->boots) == boots && !READ_ONCE(p->online),
	       "INIT: AP %u stops and waits for a SIPI", t);
	apic_icr(t, ICR_STARTUP | SIPI_VECTOR);
	bool up = spin_until(READ_ONCE(p->boots) == boots + 1 && READ_ONCE(p->online), 1000);
	report(up, "SIPI vector %#x restarts AP %u through the trampoline", SIPI_VECTOR, t);
	if (!up)
		return;
	report(p->spiv_at_boot == 0xff, "AP %u: INIT reset SPIV to 0xff again", t);
	seen_id[t] = ~0u;
	on_cpu(t, whoami, NULL);
	report(seen_id[t] == t, "AP %u runs code after the restart", t);
	report(irq_count[t][PROBE_VECTOR] == 0,
	       "a fixed IPI sent while AP %u waited for SIPI was not delivered", t);
	apic_icr(t, ICR_STARTUP | SIPI_VECTOR);
	spin_delay_us(5000);
	seen_id[t] = ~0u;
	on_cpu(t, whoami, NULL);
	report(READ_ONCE(p->boots) == boots + 1 && seen_id[t] == t,
	       "a SIPI to a running AP %u is ignored", t);
}
