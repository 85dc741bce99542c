/*
 * logical: logical-destination IPIs reach exactly the selected CPUs.
 * xAPIC flat model (DFR 0xffffffff, LDR bit per CPU): every subset of the CPUs, an
 * unused bit, the 0xff broadcast, one lowest-priority IPI to all (exactly one taker).
 * xAPIC cluster model (DFR 0x0fffffff, LDR = cluster << 4 | bit): each cluster and
 * bit combination. x2APIC: LDR is read-only and derived from the x2APIC ID (cluster
 * id >> 4 in bits 31:16, bit 1 << (id & 15)), DFR is gone, logical IPIs by cluster/mask.
 * Needs 2 or more CPUs (APIC IDs below 8).
 */
#include "libguest.h"
#include "expect.h"

static u32 bsp, n, nall; /* subsets are enumerated over n <= 4 CPUs; all nall are set up */
static volatile u32 reg_seen[MAX_CPUS][2];
static volatile int fault_seen[MAX_CPUS][3];

/* arg: DFR << 32 | LDR; each CPU programs its own APIC */
static void set_logical(void *arg)
{
	u64 a = (u64)arg;
	u32 me = smp_id();

	apic_write(APIC_DFR, a >> 32);
	apic_write(APIC_LDR, (u32)a);
	reg_seen[me][0] = apic_read(APIC_DFR);
	reg_seen[me][1] = apic_read(APIC_LDR);
}

static bool program_all(u32 dfr, u32 (*ldr_of)(u32 idx), const char *model)
{
	bool ok = true;

	for (u32 i = 0; i < nall; i++) {
		u32 id = cpu_ids[i], ldr = ldr_of(i);
		on_cpu(id, set_logical, (void *)(((u64)dfr << 32) | ldr));
		if (reg_seen[id][0] != dfr || (reg_seen[id][1] & 0xff000000) != ldr) {
			info("CPU %u: DFR %x LDR %x, wrote %x %x", id, reg_seen[id][0], reg_seen[id][1],
			     dfr, ldr);
			ok = false;
		}
	}
	return report(ok, "xAPIC %s model: every CPU reads back its DFR and LDR", model);
}

static u32 flat_ldr(u32 idx) { return 1u << (24 + idx); }
/* CPUs 0,1,2,3 -> (cluster 0, bit 0), (1, 0), (0, 1), (1, 1) */
static u32 cluster_ldr(u32 idx) { return ((idx & 1) << 28) | (1u << (24 + (idx >> 1))); }

static u32 ids_of(u32 idx_mask)
{
	u32 m = 0;
	for (u32 i = 0; i < nall; i++)
		if ((idx_mask >> i) & 1)
			m |= 1u << cpu_ids[i];
	return m;
}

static void send(u32 dest, u32 low)
{
	apic_icr(dest, low);
}

static void xapic_flat(void)
{
	char what[96];

	if (!program_all(0xffffffff, flat_ldr, "flat"))
		return;
	for (u32 m = 1; m < (1u << n); m++) {
		expect_begin(0x70);
		send(m, ICR_LOGICAL | ICR_ASSERT | 0x70);
		snprintf(what, sizeof(what), "xAPIC flat logical destination %#x", m);
		expect_end(0x70, ids_of(m), what);
	}
	if (nall < 8) {
		expect_begin(0x71);
		send(0x80, ICR_LOGICAL | ICR_ASSERT | 0x71);
		expect_end(0x71, 0, "xAPIC flat logical destination 0x80 (no CPU has that bit)");
	} else {
		skip("xAPIC flat logical destination with no CPU: all 8 LDR bits are in use");
	}

	expect_begin(0x72);
	send(0xff, ICR_LOGICAL | ICR_ASSERT | 0x72);
	expect_end(0x72, online_mask(), "xAPIC flat logical destination 0xff is a broadcast");

	expect_begin(0x73);
	send((1u << n) - 1, ICR_LOGICAL | ICR_LOWEST | ICR_ASSERT | 0x73);
	wait_until(({
			   u32 s = 0;
			   for (u32 i = 0; i < n; i++)
				   s += expect_delta(cpu_ids[i], 0x73);
			   s;
		   }) >= 1, 1000);
	delay_us(2000);
	u32 total = 0;
	for (u32 i = 0; i < n; i++)
		total += expect_delta(cpu_ids[i], 0x73);
	if (!report(total == 1, "xAPIC lowest-priority IPI to all CPUs is taken by exactly one"))
		info("%u CPUs took it", total);
}

static void xapic_cluster(void)
{
	char what[96];

	if (!program_all(0x0fffffff, cluster_ldr, "cluster"))
		return;
	for (u32 c = 0; c < 2; c++) {
		for (u32 m = 1; m < 4; m++) {
			u32 idx_mask = 0;
			for (u32 i = 0; i < nall; i++)
				if ((cluster_ldr(i) >> 28) == c && ((cluster_ldr(i) >> 24) & m & 0xf))
					idx_mask |= 1u << i;
			expect_begin(0x74);
			send(c << 4 | m, ICR_LOGICAL | ICR_ASSERT | 0x74);
			snprintf(what, sizeof(what), "xAPIC cluster logical destination %#x", c << 4 | m);
			expect_end(0x74, ids_of(idx_mask), what);
		}
	}
	expect_begin(0x75);
	send(0x21, ICR_LOGICAL | ICR_ASSERT | 0x75);
	expect_end(0x75, 0, "xAPIC cluster logical destination 0x21 (empty cluster 2)");

	expect_begin(0x76);
	send(0xff, ICR_LOGICAL | ICR_ASSERT | 0x76);
	expect_end(0x76, online_mask(), "xAPIC cluster logical destination 0xff is a broadcast");
}

static void x2apic_logical_setup(void *arg)
{
	u32 me = smp_id();
	u64 v;

	fault_seen[me][0] = enable_x2apic();
	reg_seen[me][1] = apic_read(APIC_LDR);
	fault_seen[me][1] = wrmsr_safe(MSR_X2APIC_BASE + (APIC_LDR >> 4), 0x10001);
	fault_seen[me][2] = rdmsr_safe(MSR_X2APIC_BASE + (APIC_DFR >> 4), &v);
	reg_seen[me][0] = apic_read(APIC_LDR);
}

static void x2apic_logical(void)
{
	char what[96];
	bool ok_ldr = true, ok_ro = true, ok_dfr = true, ok_en = true;

	if (!cpu_has_x2apic()) {
		skip("x2APIC logical destinations: CPUID.1:ECX[21] (x2APIC) is clear");
		return;
	}
	for (u32 i = 0; i < nall; i++) {
		u32 id = cpu_ids[i];
		u32 want = ((id >> 4) << 16) | (1u << (id & 15));
		on_cpu(id, x2apic_logical_setup, NULL);
		ok_en &= fault_seen[id][0] == 0;
		ok_ldr &= reg_seen[id][1] == want;
		ok_ro &= fault_seen[id][1] == 13 && reg_seen[id][0] == want;
		ok_dfr &= fault_seen[id][2] == 13;
		if (reg_seen[id][1] != want)
			info("CPU %u: x2APIC LDR %x, expected %x", id, reg_seen[id][1], want);
	}
	if (!report(ok_en, "every CPU switches to x2APIC mode"))
		return;
	report(ok_ldr, "x2APIC LDR = (id >> 4) << 16 | 1 << (id & 15) on every CPU");
	report(ok_ro, "x2APIC LDR is read-only (WRMSR #GP, value unchanged)");
	report(ok_dfr, "x2APIC has no DFR (RDMSR 0x80e #GP)");

	for (u32 m = 1; m < (1u << n); m++) {
		u32 dest = ids_of(m); /* cluster 0: the mask is the APIC ID bits */
		expect_begin(0x78);
		send(dest, ICR_LOGICAL | ICR_ASSERT | 0x78);
		snprintf(what, sizeof(what), "x2APIC logical destination cluster 0 mask %#x", dest);
		expect_end(0x78, dest, what);
	}
	expect_begin(0x79);
	send(0x10000 | online_mask(), ICR_LOGICAL | ICR_ASSERT | 0x79);
	expect_end(0x79, 0, "x2APIC logical destination in cluster 1 (no CPU there)");

	expect_begin(0x7a);
	send(0xffffffff, ICR_LOGICAL | ICR_ASSERT | 0x7a);
	expect_end(0x7a, online_mask(), "x2APIC logical destination 0xffffffff is a broadcast");
}

void test_main(void)
{
	bsp = smp_id();
	smp_init();
	n = nall = nr_online;
	bool ids_ok = true;
	for (u32 i = 0; i < n; i++)
		ids_ok &= cpu_ids[i] < 8;
	if (n < 2 || !ids_ok) {
		skip("logical destinations: need 2 or more CPUs with APIC IDs below 8 (have %u)", n);
		return;
	}
	if (n > 4) {
		info("subsets of the first 4 of %u CPUs", n);
		n = 4;
	}
	xapic_flat();
	xapic_cluster();
	x2apic_logical();
}
