/*
 * tpr: task priority. A self-IPI whose priority class (vector >> 4) is not above
 * PPR's class stays pending in IRR and is taken as soon as TPR (written through the TPR
 * register or through CR8, CR8 = TPR[7:4]) drops below it; a higher class passes at
 * once. PPR = TPR when nothing is in service, and max(TPR, ISRV class) -- PPR = TPR if
 * TPR[7:4] >= ISRV[7:4], else ISRV & 0xf0 -- while a vector is in service.
 */
#include "libguest.h"

static u32 bsp;
static volatile u32 in_handler[8];
static volatile bool isr_seen;

static u32 count(int v) { return READ_ONCE(irq_count[bsp][v]); }

static void ppr_handler(struct frame *f)
{
	isr_seen = apic_vector_bit(APIC_ISR, 0x65);
	in_handler[0] = apic_read(APIC_PPR);
	apic_write(APIC_TPR, 0x70);
	in_handler[1] = apic_read(APIC_PPR);
	apic_write(APIC_TPR, 0x65);
	in_handler[2] = apic_read(APIC_PPR);
	apic_write(APIC_TPR, 0x55);
	in_handler[3] = apic_read(APIC_PPR);
	apic_write(APIC_TPR, 0x30);
	apic_eoi();
	in_handler[4] = apic_read(APIC_PPR);
	in_handler[5] = apic_vector_bit(APIC_ISR, 0x65);
}

static bool write_cr8_safe(u64 v)
{
	this_cpu()->fault_vector = 0;
	asm volatile("1: mov %0, %%cr8\n2:\n"
		     ".pushsection .extable, \"a\"\n.quad 1b, 2b\n.popsection" :: "r"(v) : "memory");
	return this_cpu()->fault_vector == 0;
}

static void tpr_register(void)
{
	apic_write(APIC_TPR, 0x50);
	u32 ppr = apic_read(APIC_PPR);
	if (!report(apic_read(APIC_TPR) == 0x50 && ppr == 0x50,
		    "TPR 0x50 with nothing in service: PPR = TPR"))
		info("PPR %x", ppr);

	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x45);
	delay_us(2000);
	report(count(0x45) == 0 && apic_vector_bit(APIC_IRR, 0x45),
	       "TPR 0x50: self-IPI 0x45 (class 4) stays pending in IRR");

	apic_write(APIC_TPR, 0x40);
	delay_us(2000);
	report(count(0x45) == 0 && apic_vector_bit(APIC_IRR, 0x45),
	       "TPR 0x40: vector 0x45 of the same class still waits");

	apic_write(APIC_TPR, 0x3f);
	u32 at_once = count(0x45);
	bool taken = wait_until(count(0x45) == 1, 1000);
	delay_us(1000);
	report(taken && count(0x45) == 1 && !apic_vector_bit(APIC_IRR, 0x45),
	       "TPR 0x3f (class 3): vector 0x45 is taken, once, and leaves IRR");
	info("vector 0x45 %s taken at the VM entry right after the TPR write",
	     at_once ? "was" : "was not");

	apic_write(APIC_TPR, 0x50);
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x61);
	report(wait_until(count(0x61) == 1, 1000),
	       "TPR 0x50: self-IPI 0x61 (class 6) is taken at once");
	apic_write(APIC_TPR, 0);
}

static void tpr_cr8(void)
{
	write_cr8(5);
	u32 tpr = apic_read(APIC_TPR);
	if (!report(tpr == 0x50, "CR8 = 5 sets TPR to 0x50"))
		info("TPR %x", tpr);
	apic_write(APIC_TPR, 0x70);
	u64 cr8 = read_cr8();
	if (!report(cr8 == 7, "TPR 0x70 reads back as CR8 = 7"))
		info("CR8 %lu", cr8);
	apic_write(APIC_TPR, 0x7f);
	report(read_cr8() == 7, "TPR 0x7f reads back as CR8 = 7 (TPR[7:4])");

	write_cr8(5);
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x46);
	delay_us(2000);
	report(count(0x46) == 0 && apic_vector_bit(APIC_IRR, 0x46),
	       "CR8 = 5: self-IPI 0x46 stays pending in IRR");
	write_cr8(0);
	bool taken = wait_until(count(0x46) == 1, 1000);
	delay_us(1000);
	report(taken && count(0x46) == 1 && !apic_vector_bit(APIC_IRR, 0x46),
	       "CR8 = 0: vector 0x46 is taken, once");
	report(!write_cr8_safe(0x10) && read_cr8() == 0,
	       "MOV to CR8 with bits 63:4 set raises #GP");
	report(apic_read(APIC_TPR) == 0 && apic_read(APIC_PPR) == 0, "TPR and PPR back to 0");
}

static void ppr_in_service(void)
{
	set_handler(0x65, ppr_handler);
	apic_write(APIC_TPR, 0x30);
	apic_icr(0, ICR_SELF | ICR_ASSERT | 0x65);
	if (!report(wait_until(count(0x65) == 1, 1000), "TPR 0x30: self-IPI 0x65 is taken"))
		return;
	const char *why = isr_seen ? NULL : ISR_QUIRK;
	report_unless(why, isr_seen, "ISR bit 0x65 is set inside its handler");
	info("PPR in the handler: %x %x %x %x, after EOI %x", in_handler[0], in_handler[1],
	     in_handler[2], in_handler[3], in_handler[4]);
	report_unless(why, in_handler[0] == 0x60,
		      "0x65 in service, TPR 0x30: PPR = ISRV class 0x60");
	report(in_handler[1] == 0x70, "0x65 in service, TPR 0x70: PPR = TPR 0x70");
	report_unless(why, in_handler[2] == 0x65,
		      "0x65 in service, TPR 0x65 (same class): PPR = TPR 0x65");
	report_unless(why, in_handler[3] == 0x60,
		      "0x65 in service, TPR 0x55: PPR = ISRV class 0x60");
	report(in_handler[4] == 0x30 && !in_handler[5], "after EOI: ISR clear and PPR = TPR 0x30");
	apic_write(APIC_TPR, 0);
}

void test_main(void)
{
	bsp = smp_id();
	tpr_register();
	tpr_cr8();
	ppr_in_service();
}
