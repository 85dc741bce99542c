#ifndef HALT_H
#define HALT_H
#define RESCUE_VECTOR 0x31
/*
 * halt_wait(cond, rescue_ms, limit_ms): HLT with IF=1 until cond() holds; another CPU
 * sends RESCUE_VECTOR every rescue_ms meanwhile. Returns the number of rescue IPIs sent
 * (0: the awaited interrupt itself woke the CPU), -1 with no second CPU online, -2 if
 * cond() still fails after limit_ms.
 */
int halt_wait(bool (*cond)(void), u64 rescue_ms, u64 limit_ms);
u32 halt_rescuer(void);
#endif
