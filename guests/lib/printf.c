/* Serial output (COM1, polled 16550), a small vsnprintf, and the PASS/FAIL/SKIP reports. */
#include "libguest.h"

#define COM1 0x3f8

static spinlock_t print_lock;
u32 tests_run, tests_failed;

void serial_init(void)
{
	outb(0x80, COM1 + 3); /* LCR: DLAB */
	outb(1, COM1 + 0);    /* DLL: divisor 1 */
	outb(0, COM1 + 1);    /* DLM */
	outb(3, COM1 + 3);    /* LCR: 8N1 */
}

static void serial_putc(char c)
{
	/* wait for THRE (LSR bit 5); bounded so a missing UART cannot hang us */
	for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
		cpu_relax();
	outb(c, COM1);
}

static void serial_write(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

void puts_serial(const char *s)
{
	u64 f = irq_save();
	spin_lock(&print_lock);
	serial_write(s);
	spin_unlock(&print_lock);
	irq_restore(f);
}

struct outbuf {
	char *buf;
	int size, len;
};

static void emit(struct outbuf *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void emit_num(struct outbuf *o, u64 v, int base, bool neg, int width, char pad, bool upper)
{
	char tmp[24];
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	if (neg)
		width--;
	if (neg && pad == '0')
		emit(o, '-');
	for (int i = n; i < width; i++)
		emit(o, pad);
	if (neg && pad != '0')
		emit(o, '-');
	while (n)
		emit(o, tmp[--n]);
}

int vsnprintf(char *buf, int size, const char *fmt, va_list ap)
{
	struct outbuf o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(&o, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		bool left = false, alt = false;
		int width = 0, lng = 0;
		for (;; fmt++) {
			if (*fmt == '0')
				pad = '0';
			else if (*fmt == '-')
				left = true;
			else if (*fmt == '#')
				alt = true;
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			lng++;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
			emit_num(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad, false);
			break;
		}
		case 'u':
			emit_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, false, width, pad, false);
			break;
		case 'x':
		case 'X':
			if (alt) {
				emit(&o, '0');
				emit(&o, 'x');
			}
			emit_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, false, width, pad,
				 *fmt == 'X');
			break;
		case 'p':
			emit(&o, '0');
			emit(&o, 'x');
			emit_num(&o, (u64)va_arg(ap, void *), 16, false, width, pad, false);
			break;
		case 'c':
			emit(&o, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			int n;
			if (!s)
				s = "(null)";
			n = strlen(s);
			if (!left)
				for (int i = n; i < width; i++)
					emit(&o, ' ');
			while (*s)
				emit(&o, *s++);
			if (left)
				for (int i = n; i < width; i++)
					emit(&o, ' ');
			break;
		}
		case '%':
			emit(&o, '%');
			break;
		case 0:
			fmt--;
			break;
		default:
			emit(&o, '%');
			emit(&o, *fmt);
		}
	}
	if (size > 0)
		buf[o.len < size ? o.len : size - 1] = 0;
	return o.len;
}

int snprintf(char *buf, int size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

void printf(const char *fmt, ...)
{
	char buf[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	puts_serial(buf);
}

static void vreport_line(const char *tag, const char *fmt, va_list ap)
{
	char buf[256];
	int n = snprintf(buf, sizeof(buf), "%s: ", tag);

	vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
	n = strlen(buf);
	buf[n] = '\n';
	buf[n + 1] = 0;
	puts_serial(buf);
}

/* Test counters are updated under the print lock's protection of a separate lock. */
static spinlock_t count_lock;
static void count(bool failed)
{
	u64 f = irq_save();
	spin_lock(&count_lock);
	tests_run++;
	if (failed)
		tests_failed++;
	spin_unlock(&count_lock);
	irq_restore(f);
}

void pass(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport_line("PASS", fmt, ap);
	va_end(ap);
	count(false);
}

void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport_line("FAIL", fmt, ap);
	va_end(ap);
	count(true);
}

void skip(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport_line("SKIP", fmt, ap);
	va_end(ap);
}

void info(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport_line("INFO", fmt, ap);
	va_end(ap);
}

bool report(bool ok, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport_line(ok ? "PASS" : "FAIL", fmt, ap);
	va_end(ap);
	count(!ok);
	return ok;
}

bool report_unless(const char *why, bool ok, const char *fmt, ...)
{
	va_list ap;
	char msg[200];

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (why) {
		skip("%s [%s]", msg, why);
		return true;
	}
	return report(ok, "%s", msg);
}

void exit(int code)
{
	cli();
	outl(code, 0xf4);
	for (;;)
		asm volatile("hlt");
}

void abort_test(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport_line("FAIL", fmt, ap);
	va_end(ap);
	count(true);
	printf("SUMMARY: %u tests, %u failures\n", tests_run, tests_failed);
	exit(1);
}
