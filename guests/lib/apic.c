/* Local APIC (xAPIC MMIO or x2APIC MSRs, following this CPU's mode) and IOAPIC access. */
#include "libguest.h"

static inline volatile u32 *apic_mmio(u32 reg)
{
	return (volatile u32 *)(APIC_MMIO + reg);
}

bool apic_x2apic_mode(void)
{
	return this_cpu()->x2apic;
}

u32 apic_read(u32 reg)
{
	if (this_cpu()->x2apic)
		return rdmsr(MSR_X2APIC_BASE + (reg >> 4));
	return *apic_mmio(reg);
}

void apic_write(u32 reg, u32 val)
{
	if (this_cpu()->x2apic)
		wrmsr(MSR_X2APIC_BASE + (reg >> 4), val);
	else
		*apic_mmio(reg) = val;
}

int apic_read_safe(u32 reg, u32 *val)
{
	u64 v = 0;
	int r;

	if (!this_cpu()->x2apic) {
		*val = *apic_mmio(reg);
		return 0;
	}
	r = rdmsr_safe(MSR_X2APIC_BASE + (reg >> 4), &v);
	*val = v;
	return r;
}

int apic_write_safe(u32 reg, u32 val)
{
	if (!this_cpu()->x2apic) {
		*apic_mmio(reg) = val;
		return 0;
	}
	return wrmsr_safe(MSR_X2APIC_BASE + (reg >> 4), val);
}

void apic_icr(u32 dest, u32 low)
{
	if (this_cpu()->x2apic) {
		wrmsr(MSR_X2APIC_BASE + (APIC_ICR >> 4), ((u64)dest << 32) | low);
	} else {
		*apic_mmio(APIC_ICR2) = dest << 24;
		*apic_mmio(APIC_ICR) = low;
	}
}

void apic_eoi(void)
{
	apic_write(APIC_EOI, 0);
}

u32 apic_id(void)
{
	u32 id = apic_read(APIC_ID);
	return this_cpu()->x2apic ? id : id >> 24;
}

int enable_x2apic(void)
{
	u64 base = rdmsr(MSR_IA32_APICBASE);
	int r = wrmsr_safe(MSR_IA32_APICBASE, base | APICBASE_EN | APICBASE_EXTD);

	if (!r)
		this_cpu()->x2apic = 1;
	return r;
}

void apic_sw_enable(void)
{
	apic_write(APIC_SPIV, 0x100 | SPURIOUS_VECTOR);
}

bool apic_vector_bit(u32 base, int vector)
{
	return (apic_read(base + (vector / 32) * 0x10) >> (vector % 32)) & 1;
}

/* ---------------------------------------------------------------- IOAPIC */

static spinlock_t ioapic_lock;

u32 ioapic_read(u32 index)
{
	u64 f = irq_save();
	u32 v;

	spin_lock(&ioapic_lock);
	*(volatile u32 *)IOAPIC_MMIO = index;
	v = *(volatile u32 *)(IOAPIC_MMIO + 0x10);
	spin_unlock(&ioapic_lock);
	irq_restore(f);
	return v;
}

void ioapic_write(u32 index, u32 val)
{
	u64 f = irq_save();

	spin_lock(&ioapic_lock);
	*(volatile u32 *)IOAPIC_MMIO = index;
	*(volatile u32 *)(IOAPIC_MMIO + 0x10) = val;
	spin_unlock(&ioapic_lock);
	irq_restore(f);
}

u64 ioapic_read_rte(int pin)
{
	u32 lo = ioapic_read(0x10 + 2 * pin);
	u32 hi = ioapic_read(0x11 + 2 * pin);
	return ((u64)hi << 32) | lo;
}

void ioapic_write_rte(int pin, u64 rte)
{
	ioapic_write(0x11 + 2 * pin, rte >> 32);
	ioapic_write(0x10 + 2 * pin, (u32)rte);
}
