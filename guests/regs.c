/*
 * regs: local APIC registers and modes, as KVM presents them.
 *  - values at reset: LVR 0x50014 (version 0x14, 6 LVT entries, no directed EOI with
 *    KVM's IOAPIC), TPR/PPR/LDR/ESR/timer registers 0, DFR all ones, ISR/TMR/IRR empty,
 *    LVTs masked except the BSP's LVT0 (ExtINT, KVM_X86_QUIRK_LINT0_REENABLED);
 *  - SPIV: software disable masks every LVT and keeps them masked, fixed interrupts are
 *    not accepted; bit 12 (EOI-broadcast suppression) is reserved without directed EOI;
 *  - the xAPIC ID is writable and IPIs follow the new ID;
 *  - IA32_APIC_BASE: relocating the APIC moves its registers; x2APIC ID/LVR are
 *    read-only (#GP), APR/ICR2 do not exist in x2APIC mode (#GP); the mode transitions
 *    KVM allows (xAPIC <-> disabled -> xAPIC -> x2APIC) and refuses (x2APIC -> xAPIC,
 *    disabled -> x2APIC, EXTD without EN) with #GP; CPUID.1:EDX.APIC follows EN; the
 *    xAPIC ID is the initial one again after re-enabling.
 */
#include "libguest.h"

static u32 bsp;

static u32 count(int v) { return READ_ONCE(irq_count[bsp][v]); }

static void reset_values(void)
{
	u32 lvr = apic_read(APIC_LVR);
	if (!report(lvr == 0x50014,
		    "LVR = 0x50014: version 0x14, 6 LVT entries, no directed EOI (KVM's IOAPIC)"))
		info("LVR %x", lvr);

	static const struct {
		u32 reg, value;
		const char *name;
	} regs[] = {
		{ APIC_TPR, 0, "TPR" },		{ APIC_PPR, 0, "PPR" },
		{ APIC_LDR, 0, "LDR" },		{ APIC_DFR, 0xffffffff, "DFR" },
		{ APIC_ESR, 0, "ESR" },		{ APIC_TMICT, 0, "TMICT" },
		{ APIC_TMCCT, 0, "TMCCT" },	{ APIC_TDCR, 0, "TDCR" },
		{ APIC_LVTT, LVT_MASKED, "LVTT" }, { APIC_LVTTHMR, LVT_MASKED, "LVTTHMR" },
		{ APIC_LVTPC, LVT_MASKED, "LVTPC" }, { APIC_LVT1, LVT_MASKED, "LVT1" },
		{ APIC_LVTERR, LVT_MASKED, "LVTERR" },
	};
	bool ok = true;
	for (u32 i = 0; i < ARRAY_SIZE(regs); i++) {
		u32 v = apic_read(regs[i].reg);
		if (v != regs[i].value) {
			info("%s = %x, expected %x", regs[i].name, v, regs[i].value);
			ok = false;
		}
	}
	report(ok, "reset: TPR PPR LDR ESR TMICT TMCCT TDCR 0, DFR ~0, LVTs other than LVT0 masked");

	u32 lvt0 = apic_read(APIC_LVT0);
	if (!report(lvt0 == 0x700, "reset: the BSP's LVT0 is ExtINT, unmasked (0x700)"))
		info("LVT0 %x", lvt0);

	ok = true;
	for (u32 i = 0; i < 8; i++)
		ok &= !apic_read(APIC_ISR + 16 * i) && !apic_read(APIC_TMR + 16 * i) &&
		      !apic_read(APIC_IRR + 16 * i);
	report(ok, "reset: ISR, TMR and IRR are empty");
}

static void software_disable(void)
{
	apic_write(APIC_LVTT, 0xe0 | LVT_MASKED);
	apic_write(APIC_SPIV, 0xff); /* bit 8 clear: software disabled */
	apic_write(APIC_LVTT, 0xe0);
	apic_write(APIC_LVTERR, 0xe1);
	u32 lvtt = apic_read(APIC_LVTT), lvterr = apic_read(APIC_LVTERR);
	if (!report(lvtt == (0xe0 | LVT_MASKED) && lvterr == (0xe1 | LVT_MASKED),
		    "software-disabled APIC: LVT writes keep the mask bit set"))
		info("LVTT %x LVTERR %x", lvtt, lvterr);

	u32 c = count(0x41);
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x41);
	delay_us(2000);
	report(count(0x41) == c && !apic_vector_bit(APIC_IRR, 0x41),
	       "software-disabled APIC: a fixed self-IPI is not accepted");

	apic_write(APIC_SPIV, 0x1ff);
	report(apic_read(APIC_LVTT) == (0xe0 | LVT_MASKED),
	       "software re-enable leaves the LVTs masked");
	apic_write(APIC_LVTT, LVT_MASKED);
	apic_write(APIC_LVTERR, LVT_MASKED);

	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x41);
	report(wait_until(count(0x41) == c + 1, 1000), "re-enabled APIC accepts the self-IPI");

	apic_write(APIC_SPIV, 0x11ff);
	u32 spiv = apic_read(APIC_SPIV);
	if (!report(spiv == 0x1ff, "SPIV bit 12 is reserved without directed-EOI support (LVR[24])"))
		info("SPIV %x", spiv);
	apic_write(APIC_SPIV, 0x1ff);
}

static void xapic_id(void)
{
	u32 nid = bsp + 0x0a;

	apic_write(APIC_ID, nid << 24);
	u32 id = apic_read(APIC_ID);
	u32 c = count(0x42);
	apic_icr(nid, ICR_ASSERT | 0x42);
	wait_until(count(0x42) == c + 1, 1000);
	u32 by_new = count(0x42) - c;
	apic_icr(bsp, ICR_ASSERT | 0x42);
	delay_us(2000);
	u32 by_old = count(0x42) - c - by_new;
	apic_write(APIC_ID, bsp << 24);
	apic_icr(bsp, ICR_ASSERT | 0x42);
	wait_until(count(0x42) == c + by_new + by_old + 1, 1000);
	u32 restored = count(0x42) - c - by_new - by_old;
	report(id == nid << 24, "the xAPIC ID register is writable");
	if (!report(by_new == 1 && by_old == 0 && restored == 1,
		    "physical IPIs follow the written xAPIC ID (new ID yes, old ID no, restored)"))
		info("IPIs taken: to the new ID %u, to the old ID %u, after restoring %u", by_new,
		     by_old, restored);
}

static void relocate(void)
{
	const u64 nbase = 0xfed40000;
	u64 base = rdmsr(MSR_IA32_APICBASE);
	u32 lvr = apic_read(APIC_LVR);

	cli(); /* no EOIs while the registers are elsewhere */
	int r = wrmsr_safe(MSR_IA32_APICBASE, nbase | (base & 0xfff));
	u64 seen = rdmsr(MSR_IA32_APICBASE);
	u32 lvr2 = *(volatile u32 *)(nbase + APIC_LVR);
	*(volatile u32 *)(nbase + APIC_TPR) = 0x20;
	wrmsr(MSR_IA32_APICBASE, base);
	sti();
	u32 tpr = apic_read(APIC_TPR);
	apic_write(APIC_TPR, 0);
	report(r == 0 && seen == (nbase | (base & 0xfff)),
	       "IA32_APIC_BASE accepts base 0xfed40000");
	report(lvr2 == lvr && tpr == 0x20,
	       "relocated to 0xfed40000, the APIC's registers answer there");
}

static bool cpuid_apic(void) { return cpuid_reg(1, 3) & CPUID1_EDX_APIC; }

static void modes(void)
{
	u64 base = rdmsr(MSR_IA32_APICBASE), v;
	u64 keep = base & ~(u64)(APICBASE_EN | APICBASE_EXTD);
	int r;

	if (!cpu_has_x2apic()) {
		skip("x2APIC register and mode checks: CPUID.1:ECX[21] (x2APIC) is clear");
		return;
	}
	r = wrmsr_safe(MSR_IA32_APICBASE, keep | APICBASE_EXTD);
	report(r == 13 && rdmsr(MSR_IA32_APICBASE) == base,
	       "IA32_APIC_BASE: EXTD without EN raises #GP");
	if (!report(enable_x2apic() == 0, "xAPIC -> x2APIC"))
		return;
	report(wrmsr_safe(0x802, 5) == 13 && rdmsr(0x802) == bsp,
	       "x2APIC ID (MSR 0x802) is read-only: WRMSR #GP");
	report(wrmsr_safe(0x803, 0) == 13, "x2APIC LVR (MSR 0x803) is read-only: WRMSR #GP");
	report(rdmsr_safe(0x809, &v) == 13, "x2APIC: APR (MSR 0x809) does not exist, RDMSR #GP");
	report(rdmsr_safe(0x831, &v) == 13, "x2APIC: ICR2 (MSR 0x831) does not exist, RDMSR #GP");
	report(rdmsr_safe(0x808, &v) == 0 && v == 0, "x2APIC: TPR is MSR 0x808");

	r = wrmsr_safe(MSR_IA32_APICBASE, keep | APICBASE_EN);
	report(r == 13 && (rdmsr(MSR_IA32_APICBASE) & APICBASE_EXTD),
	       "x2APIC -> xAPIC directly raises #GP");

	r = wrmsr_safe(MSR_IA32_APICBASE, keep);
	this_cpu()->x2apic = 0;
	bool gone = !cpuid_apic();
	report(r == 0 && !(rdmsr(MSR_IA32_APICBASE) & APICBASE_EN), "x2APIC -> disabled");
	report(gone, "CPUID.1:EDX.APIC[9] is clear while IA32_APIC_BASE.EN is clear");

	r = wrmsr_safe(MSR_IA32_APICBASE, keep | APICBASE_EN | APICBASE_EXTD);
	report(r == 13 && !(rdmsr(MSR_IA32_APICBASE) & APICBASE_EN),
	       "disabled -> x2APIC directly raises #GP");

	r = wrmsr_safe(MSR_IA32_APICBASE, keep | APICBASE_EN);
	report(r == 0 && cpuid_apic(), "disabled -> xAPIC, CPUID.1:EDX.APIC set again");
	info("after re-enabling: SPIV %x, ID %x", apic_read(APIC_SPIV), apic_read(APIC_ID));
	report(apic_id() == bsp, "re-enabled xAPIC has the initial APIC ID");
	apic_sw_enable();
	u32 c = count(0x43);
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x43);
	report(wait_until(count(0x43) == c + 1, 1000), "the re-enabled xAPIC takes a self-IPI");
}

void test_main(void)
{
	bsp = smp_id();
	reset_values();
	software_disable();
	xapic_id();
	relocate();
	modes();
}
