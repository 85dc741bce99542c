"""The port-I/O devices a test kernel needs, as QEMU's PC machine has them:

* COM1 at 0x3F8: enough of the 16550 UART for polled output (THR, LSR with THRE|TEMT always
  set, the divisor latch behind LCR.DLAB, IER/IIR/FCR/MCR/MSR/SCR), no receive, no interrupt;
* isa-debug-exit at 0xF4 (4 ports): a write ends the VM with exit status ``(value << 1) | 1``;
* fw_cfg's legacy I/O interface: a 16-bit selector write to 0x510, byte reads from 0x511
  (signature, ID, RAM size, number of CPUs, max CPUs);
* QEMU's pc-testdev: an 8-bit write of v to 0x2000 + n (n < 24) sets ISA IRQ line n to !!v;
  0xE0 is a 4-byte latch; 0xE4 ("flush page") is accepted and ignored.

Every other port reads as all ones and ignores writes. Devices never touch the interrupt
controller themselves: the test device calls the ``irq_line`` function it was given.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

COM1 = 0x3F8
DEBUG_EXIT = 0xF4
FW_CFG_CTL = 0x510
FW_CFG_DATA = 0x511
TESTDEV_IRQ = 0x2000
TESTDEV_NR_IRQS = 24
TESTDEV_LATCH = 0xE0
TESTDEV_FLUSH = 0xE4

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F

UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LCR_DLAB = 0x80


class Serial16550:
    """A polled 16550 at *base*: characters written to THR go to *sink* (bytes)."""

    def __init__(self, sink: Callable[[bytes], None], base: int = COM1) -> None:
        self.base = base
        self.sink = sink
        self.lcr = 0
        self.dll = 0
        self.dlm = 0
        self.ier = 0
        self.fcr = 0
        self.mcr = 0
        self.scr = 0

    def read(self, port: int) -> int:
        r = port - self.base
        dlab = self.lcr & UART_LCR_DLAB
        if r == 0:
            return self.dll if dlab else 0  # RBR: nothing is ever received
        if r == 1:
            return self.dlm if dlab else self.ier
        if r == 2:
            return 0xC1 if self.fcr & 1 else 0x01  # IIR: no interrupt pending (FIFOs on)
        if r == 3:
            return self.lcr
        if r == 4:
            return self.mcr
        if r == 5:
            return UART_LSR_THRE | UART_LSR_TEMT  # the transmitter is always empty
        if r == 6:
            return 0xB0  # MSR: DCD, DSR, CTS
        return self.scr

    def write(self, port: int, value: int) -> None:
        r = port - self.base
        value &= 0xFF
        dlab = self.lcr & UART_LCR_DLAB
        if r == 0:
            if dlab:
                self.dll = value
            else:
                self.sink(bytes((value,)))
        elif r == 1:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif r == 2:
            self.fcr = value
        elif r == 3:
            self.lcr = value
        elif r == 4:
            self.mcr = value & 0x1F
        elif r == 7:
            self.scr = value


class FwCfg:
    """fw_cfg's legacy selector/data ports with the items a test kernel reads."""

    def __init__(self, nr_cpus: int, ram_size: int) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),  # the traditional interface, no DMA
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NB_CPUS: struct.pack("<H", nr_cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", nr_cpus),
        }
        self.key = 0
        self.offset = 0

    def select(self, key: int) -> None:
        self.key = key & 0xFFFF
        self.offset = 0

    def read_byte(self) -> int:
        data = self.items.get(self.key & 0x3FFF, b"")
        if self.offset < len(data):
            v = data[self.offset]
            self.offset += 1
            return v
        return 0


class PortBus:
    """Port dispatch for the VMM. ``irq_line(n, level)`` is the interrupt controller's ISA
    line; ``on_exit(status)`` is called by isa-debug-exit; ``pic`` (optional) is
    ``(read(port), write(port, value))`` for the PIC/ELCR ports of a userspace irqchip."""

    PIC_PORTS = frozenset((0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1))

    def __init__(self, *, serial: Serial16550, fw_cfg: FwCfg,
                 irq_line: Callable[[int, int], None], on_exit: Callable[[int], None],
                 pic: tuple[Callable[[int], int], Callable[[int, int], None]] | None = None
                 ) -> None:
        self.serial = serial
        self.fw_cfg = fw_cfg
        self.irq_line = irq_line
        self.on_exit = on_exit
        self.pic = pic
        self.latch = 0

    def read(self, port: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        s = self.serial
        if s.base <= port < s.base + 8:
            return s.read(port)
        if port == FW_CFG_DATA:
            return self.fw_cfg.read_byte()
        if port == TESTDEV_LATCH:
            return self.latch & ones
        if self.pic is not None and port in self.PIC_PORTS:
            return self.pic[0](port)
        return ones

    def write(self, port: int, size: int, value: int) -> None:
        s = self.serial
        if s.base <= port < s.base + 8:
            s.write(port, value)
        elif DEBUG_EXIT <= port < DEBUG_EXIT + 4:
            # QEMU's isa-debug-exit: exit((val << 1) | 1), val as wide as the access
            self.on_exit(((value << 1) | 1) & 0xFF)
        elif port == FW_CFG_CTL:
            self.fw_cfg.select(value)
        elif TESTDEV_IRQ <= port < TESTDEV_IRQ + TESTDEV_NR_IRQS:
            self.irq_line(port - TESTDEV_IRQ, 1 if value & 0xFF else 0)
        elif port == TESTDEV_LATCH:
            self.latch = value
        elif self.pic is not None and port in self.PIC_PORTS:
            self.pic[1](port, value & 0xFF)
        # TESTDEV_FLUSH, POST codes (0x80), Bochs shutdown (0x8900) and the rest: ignored


# ---------------------------------------------------------------- what a Linux guest probes
UART_IER_RDI, UART_IER_THRI = 0x01, 0x02
UART_IIR_NO_INT, UART_IIR_THRI, UART_IIR_RDI = 0x01, 0x02, 0x04
UART_MCR_OUT2, UART_MCR_LOOP = 0x08, 0x10
UART_LSR_DR = 0x01


class Uart16550(Serial16550):
    """A 16550A with interrupts, as Linux's 8250 driver uses it (what QEMU's serial.c does):
    the THR-empty interrupt (set when IER.THRI is enabled or a character has gone -- at once,
    the line is infinitely fast -- cleared by reading IIR while it is the reason or by a THR
    write), received characters from :meth:`receive` (RDA), loopback (MCR.LOOP: THR goes to
    RBR, the modem lines to MSR), IIR's FIFO bits. The IRQ output is gated by MCR.OUT2, as on
    a PC, and *irq_line(level)* is called whenever the output changes (an ISA line: edge
    triggered at the IOAPIC)."""

    def __init__(self, sink: Callable[[bytes], None], irq_line: Callable[[int], None],
                 base: int = COM1) -> None:
        super().__init__(sink, base)
        self.irq_line = irq_line
        self.thri_pending = False
        self.rx: list[int] = []
        self.level = 0
        self.tx_count = 0

    def _iir(self) -> int:
        fifo = 0xC0 if self.fcr & 1 else 0
        if self.ier & UART_IER_RDI and self.rx:
            return UART_IIR_RDI | fifo
        if self.ier & UART_IER_THRI and self.thri_pending:
            return UART_IIR_THRI | fifo
        return UART_IIR_NO_INT | fifo

    def _update(self) -> None:
        level = int(not self._iir() & UART_IIR_NO_INT and bool(self.mcr & UART_MCR_OUT2))
        if level != self.level:
            self.level = level
            self.irq_line(level)

    def receive(self, data: bytes) -> None:
        self.rx.extend(data)
        self._update()

    def read(self, port: int) -> int:
        r = port - self.base
        dlab = self.lcr & UART_LCR_DLAB
        if r == 0 and not dlab:
            v = self.rx.pop(0) if self.rx else 0
            self._update()
            return v
        if r == 2:
            iir = self._iir()
            if iir & 0x0F == UART_IIR_THRI:
                self.thri_pending = False
                self._update()
            return iir
        if r == 5:
            return UART_LSR_THRE | UART_LSR_TEMT | (UART_LSR_DR if self.rx else 0)
        if r == 6:
            if self.mcr & UART_MCR_LOOP:
                m = self.mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0
        return super().read(port)

    def write(self, port: int, value: int) -> None:
        r = port - self.base
        value &= 0xFF
        dlab = self.lcr & UART_LCR_DLAB
        if r == 0 and not dlab:
            if self.mcr & UART_MCR_LOOP:
                self.rx.append(value)
            else:
                self.sink(bytes((value,)))
            self.tx_count += 1
            self.thri_pending = True  # the character is gone at once
        elif r == 1 and not dlab:
            was = self.ier
            self.ier = value & 0x0F
            if self.ier & UART_IER_THRI and not was & UART_IER_THRI:
                self.thri_pending = True
        elif r == 2:
            self.fcr = value
            if value & 0x02:
                self.rx.clear()
        else:
            super().write(port, value)
        self._update()


CMOS_INDEX, CMOS_DATA = 0x70, 0x71


class Cmos:
    """The MC146818 RTC/CMOS behind ports 0x70/0x71, enough for Linux's probes: the time of
    day from the host clock (BCD, 24 hours), register A with UIP clear, B (24h, BCD), D
    (valid RAM and time); other registers read 0."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.index = 0

    def read(self) -> int:
        import time as _time

        i = self.index & 0x7F
        if i == 0x0A:
            return 0x26
        if i == 0x0B:
            return 0x02
        if i == 0x0D:
            return 0x80
        t = _time.gmtime(self.clock())
        fields = {0: t.tm_sec, 2: t.tm_min, 4: t.tm_hour, 6: t.tm_wday + 1, 7: t.tm_mday,
                  8: t.tm_mon, 9: t.tm_year % 100, 0x32: t.tm_year // 100}
        if i in fields:
            v = fields[i]
            return ((v // 10) << 4) | (v % 10)
        return 0


I8042_DATA, I8042_CMD = 0x60, 0x64
I8042_PULSE_RESET = 0xFE


class LinuxPortBus(PortBus):
    """The port bus with what a firmware-less Linux guest touches besides the console: the
    CMOS/RTC (0x70/0x71), and of the i8042 only its reset line (a write of 0xFE to 0x64,
    ``reboot=k``: *on_reset()* ends the run); there is no keyboard controller otherwise
    (0x60/0x64 read all ones: "no controller"), no PIT, no PCI (0xCF8/0xCFC read all ones: no
    configuration mechanism). Counts the accesses to ports nothing answers (``unclaimed``)."""

    CLAIMED = frozenset((0x80, 0xED, 0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF))

    def __init__(self, *, cmos: Cmos, on_reset: Callable[[], None], **kw) -> None:
        super().__init__(**kw)
        self.cmos = cmos
        self.on_reset = on_reset
        self.unclaimed: dict[int, int] = {}

    def read(self, port: int, size: int) -> int:
        if port == CMOS_DATA:
            return self.cmos.read()
        if port == CMOS_INDEX:
            return self.cmos.index
        if port not in self.CLAIMED:
            self.unclaimed[port] = self.unclaimed.get(port, 0) + 1
        return super().read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        if port == CMOS_INDEX:
            self.cmos.index = value & 0xFF
        elif port == CMOS_DATA:
            pass
        elif port == I8042_CMD and value & 0xFF == I8042_PULSE_RESET:
            self.on_reset()
        else:
            super().write(port, size, value)
