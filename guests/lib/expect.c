/* Delivery bookkeeping shared by the IPI-style programs. */
#include "libguest.h"
#include "expect.h"

static u32 snap[MAX_CPUS];

void expect_begin(int vector)
{
	for (u32 i = 0; i < nr_online; i++)
		snap[cpu_ids[i]] = READ_ONCE(irq_count[cpu_ids[i]][vector]);
}

u32 expect_delta(u32 id, int vector)
{
	return READ_ONCE(irq_count[id][vector]) - snap[id];
}

u32 online_mask(void)
{
	u32 m = 0;
	for (u32 i = 0; i < nr_online; i++)
		m |= 1u << cpu_ids[i];
	return m;
}

static bool all_seen(int vector, u32 mask)
{
	for (u32 i = 0; i < nr_online; i++) {
		u32 id = cpu_ids[i];
		if ((mask >> id) & 1 && !expect_delta(id, vector))
			return false;
	}
	return true;
}

bool expect_end(int vector, u32 mask, const char *what)
{
	bool ok;
	char got[96];
	int n = 0;

	wait_until(all_seen(vector, mask), 1000);
	delay_us(2000); /* anything extra would arrive by now */
	ok = true;
	got[0] = 0;
	for (u32 i = 0; i < nr_online; i++) {
		u32 id = cpu_ids[i];
		u32 d = expect_delta(id, vector);
		if (d != ((mask >> id) & 1))
			ok = false;
		if (n < (int)sizeof(got) - 16)
			n += snprintf(got + n, sizeof(got) - n, "%s%u:%u", n ? " " : "", id, d);
	}
	if (!ok)
		info("%s: vector %#x per CPU (id:count) %s, expected mask %#x", what, vector, got,
		     mask);
	return report(ok, "%s", what);
}
