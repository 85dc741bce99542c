/*
 * expect_begin(v) snapshots every online CPU's count of vector v; after sending,
 * expect_end(v, mask, what) waits (1 s at most) until each CPU whose APIC ID bit is in
 * mask has taken v, lets 2 ms pass, and reports PASS when each CPU in mask took v
 * exactly once and every other online CPU not at all.
 */
#ifndef EXPECT_H
#define EXPECT_H
void expect_begin(int vector);
u32 expect_delta(u32 id, int vector);
bool expect_end(int vector, u32 mask, const char *what);
u32 online_mask(void);
#endif
