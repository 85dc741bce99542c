/* C entry points: bsp_main (from start64), ap_main (from the AP trampoline), on_cpu. */
#include "libguest.h"

void serial_init(void);
void idt_init(void);
void tsc_calibrate(void);

u32 nr_cpus = 1;
u32 cpu_ids[MAX_CPUS];
u32 nr_online;
static spinlock_t online_lock;

static void percpu_init(u32 id)
{
	struct percpu *p = &percpu[id];

	p->self = p;
	p->id = id;
	wrmsr(MSR_GS_BASE, (u64)p);
	load_idt();
	p->apic_base_msr = rdmsr(MSR_IA32_APICBASE);
	p->x2apic = !!(p->apic_base_msr & APICBASE_EXTD);
	p->spiv_at_boot = apic_read(APIC_SPIV);
	apic_sw_enable();
	p->apic_id_reg = apic_id();
}

void bsp_main(void)
{
	u32 id = cpuid_apic_id();

	if (id >= MAX_CPUS) {
		serial_init();
		exit(0x7f);
	}
	idt_init();
	percpu_init(id);
	serial_init();
	tsc_calibrate();
	percpu[id].boots = 1;
	percpu[id].online = 1;
	cpu_ids[0] = id;
	nr_online = 1;
	nr_cpus = fwcfg_read(FW_CFG_NB_CPUS, 2);
	if (nr_cpus == 0)
		nr_cpus = 1;
	if (nr_cpus > MAX_CPUS) {
		info("fw_cfg reports %u CPUs; using the first %u", nr_cpus, MAX_CPUS);
		nr_cpus = MAX_CPUS;
	}
	info("BSP APIC ID %u, %u CPU(s) in fw_cfg, TSC %lu kHz%s", id, nr_cpus, tsc_khz,
	     tsc_khz_known ? " (kvmclock)" : " (assumed)");
	sti();
	test_main();
	cli();
	printf("SUMMARY: %u tests, %u failures\n", tests_run, tests_failed);
	exit(tests_failed ? 1 : 0);
}

static void ap_idle(struct percpu *p)
{
	for (;;) {
		cli();
		u32 seq = READ_ONCE(p->req_seq);
		if (seq != p->done_seq) {
			void (*fn)(void *) = p->fn;
			void *arg = p->arg;
			sti();
			fn(arg);
			cli();
			barrier();
			WRITE_ONCE(p->done_seq, seq);
			continue;
		}
		sti_hlt();
	}
}

void ap_main(u32 id)
{
	struct percpu *p = &percpu[id];

	percpu_init(id);
	/* a request left from before an INIT is dropped: the BSP starts over */
	p->done_seq = READ_ONCE(p->req_seq);
	barrier();
	if (atomic_inc(&p->boots) == 1) {
		spin_lock(&online_lock);
		cpu_ids[nr_online] = id;
		barrier();
		nr_online++;
		spin_unlock(&online_lock);
	}
	WRITE_ONCE(p->online, 1);
	ap_idle(p);
}

extern char ap_trampoline[], ap_trampoline_end[];

void copy_trampoline(void)
{
	u8 *dst = (u8 *)(u64)TRAMPOLINE_ADDR;
	u64 n = ap_trampoline_end - ap_trampoline;

	for (u64 i = 0; i < n; i++)
		WRITE_ONCE(dst[i], ap_trampoline[i]);
}

u32 smp_init(void)
{
	if (nr_cpus <= 1)
		return nr_online;
	copy_trampoline();
	apic_icr(0, ICR_ALL_BUT_SELF | ICR_INIT | ICR_ASSERT);
	spin_delay_us(1000);
	for (int i = 0; i < 2; i++) {
		apic_icr(0, ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR);
		spin_delay_us(200);
	}
	spin_until(READ_ONCE(nr_online) == nr_cpus, 3000);
	/* list the APs by APIC ID, not by arrival: messages must not depend on timing */
	u32 n = READ_ONCE(nr_online);
	for (u32 i = 2; i < n; i++)
		for (u32 j = i; j > 1 && cpu_ids[j - 1] > cpu_ids[j]; j--) {
			u32 t = cpu_ids[j];
			cpu_ids[j] = cpu_ids[j - 1];
			cpu_ids[j - 1] = t;
		}
	return n;
}

void on_cpu_async(u32 id, void (*fn)(void *), void *arg)
{
	struct percpu *p = &percpu[id];

	p->fn = fn;
	p->arg = arg;
	barrier();
	WRITE_ONCE(p->req_seq, p->req_seq + 1);
	apic_icr(id, ICR_FIXED | ICR_ASSERT | WAKE_VECTOR);
}

bool on_cpu_wait(u32 id, u64 ms)
{
	struct percpu *p = &percpu[id];

	return spin_until(READ_ONCE(p->done_seq) == READ_ONCE(p->req_seq), ms);
}

bool on_cpu(u32 id, void (*fn)(void *), void *arg)
{
	if (id == smp_id()) {
		fn(arg);
		return true;
	}
	on_cpu_async(id, fn, arg);
	if (!on_cpu_wait(id, 2000)) {
		fail("CPU %u did not run its mailbox function within 2 s", id);
		return false;
	}
	return true;
}
