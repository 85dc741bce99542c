"""Scenario files: TOML descriptions of a VM and a list of steps, each one call of the public API,
run against any backend (the model or the real KVM).

Format (see README "Scenario format" and examples/)::

    description = "what this checks"

    [vm]                      # apicv.VmConfig fields ("vcpus" is nr_vcpus)
    vcpus = 2
    x2apic_api = ["USE_32BIT_IDS"]

    [[step]]
    do = "mmio_write"         # the method to call
    vcpu = 0                  # which vCPU (vcpu_id) for vCPU methods
    offset = "SPIV"           # register names, MSR names and constants are accepted
    value = 0x1ff

    [[step]]
    do = "take_interrupts"
    vcpu = 0
    expect = [0x41]           # optional: the return value must equal this

Optional on any step: ``expect`` (return value; for get_lapic a table of register values),
``expect_fault`` (the guest #GP vector), ``expect_errno`` (an errno name such as "EINVAL"),
``expect_vmfail`` (vmlaunch/vmresume: the VM-instruction error of a VMfail, e.g. 7),
``save`` (get_lapic: keep the page under a name for a later set_lapic ``from``), ``note``.
Unknown keys and bad values are errors that name the file, the step and the field; the
whole file is checked (values, ranges, state files) before any step runs.

Why this module is long: the name tables, the operation table and the parser that checks every
field against it, and the runner that calls the table, are one format's definition; the
table keeps each operation's facts on one line, the rest is what reading TOML safely costs.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from . import uapi as U
from .api import IrqchipRoute, MsiRoute, VcpuEvents, VmConfig
from .errors import ApicvError, GuestFault, KvmError, ScenarioError, StateError
from .kvm_host import ApicvInhibit
from .regs import lookup
from .scenario_nested import (
    NESTED_KINDS,
    check_nested,
    check_nested_step,
    check_vmfail,
    parse_nested,
)
from .scenario_ops import (
    CAPS,
    CHIPS,
    COMMON,
    LOCATIONS,
    MAX_ADVANCE_NS,
    MODEL_ONLY_OPS,
    MP_STATES,
    MSR_NAMES,
    NESTED_OPS,
    OPS,
    QUIRKS,
    VM_OPTIONS,
    X2APIC_API_FLAGS,
    chip_fields,
    decode_irqchip,
    model_only_reason,
)
from .state import LapicState, vectors_of

if TYPE_CHECKING:
    from .scenario_stream import ScenarioStream

EVENT_FIELDS = tuple(f.name for f in fields(VcpuEvents))

@dataclass
class Step:
    index: int  # 1-based
    op: str
    args: dict[str, Any]
    expect: Any = None
    has_expect: bool = False
    expect_fault: int | None = None
    expect_errno: int | None = None
    expect_vmfail: int | None = None
    save: str | None = None
    note: str = ""

    def describe(self) -> str:
        parts = []
        for k, v in self.args.items():
            if k == "page":
                continue
            if k == "routes":
                parts.append("routes=[" + ", ".join(
                    f"{r.gsi}->msi {r.address_lo:#x}/{r.data:#x}" if isinstance(r, MsiRoute)
                    else f"{r.gsi}->chip{r.irqchip}:{r.pin}" for r in v) + "]")
                continue
            if k == "patch":
                parts.append("patch={" + ", ".join(f"{a}=..." for a in v) + "}")
            elif isinstance(v, int) and not isinstance(v, bool) and k not in ("vcpu", "size",
                                                                              "limit"):
                parts.append(f"{k}={v:#x}")
            else:
                parts.append(f"{k}={v}")
        return f"{self.op}(" + ", ".join(parts) + ")"


@dataclass
class Scenario:
    file: str
    description: str
    vm: VmConfig
    steps: list[Step] = field(default_factory=list)

    def make_vm(self, backend: str = "model", **extra):
        """The scenario's VM on *backend* (*extra*: VmConfig fields to replace)."""
        from .backends import Vm

        return Vm(self.vm.replace(**extra) if extra else self.vm, backend=backend)

    @property
    def nsteps(self) -> int:
        return len(self.steps)

    def iter_steps(self) -> Iterator[Step]:
        """The steps, in order (a :class:`ScenarioStream` reads them from its file)."""
        return iter(self.steps)


# ---------------------------------------------------------------- parsing
def _err(file, step, fld, msg):
    return ScenarioError(file, step, fld, msg)


def parse_int(v: Any, file: str, step: int | None, fld: str, names: dict | None = None) -> int:
    if isinstance(v, bool):
        raise _err(file, step, fld, f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        key = v.strip()
        if names is not None and key.upper() in names:
            return names[key.upper()]
        try:
            return int(key, 0)
        except ValueError:
            pass
    known = f" (known names: {', '.join(sorted(names)[:12])}...)" if names else ""
    raise _err(file, step, fld, f"expected an integer{' or a name' if names else ''}, "
                                f"got {v!r}{known}")


def _parse_reg(v: Any, file, step, fld) -> int:
    if isinstance(v, str):
        try:
            return lookup(v).offset
        except KeyError:
            pass
    off = parse_int(v, file, step, fld)
    if not 0 <= off <= 0xFFF:
        raise _err(file, step, fld, f"offset {off:#x} outside the 4 KiB APIC page")
    return off


_BITS = {"u8": 8, "u32": 32, "u64": 64}


def _parse_value(kind: str, v: Any, file: str, step: int | None, fld: str) -> Any:
    if kind == "int":
        return parse_int(v, file, step, fld)
    if kind in _BITS:
        n = parse_int(v, file, step, fld)
        if not 0 <= n < 1 << _BITS[kind]:
            raise _err(file, step, fld, f"{n:#x} does not fit in {_BITS[kind]} bits")
        return n
    if kind == "size":
        n = parse_int(v, file, step, fld)
        if n not in (1, 2, 4, 8):
            raise _err(file, step, fld, f"an access size is 1, 2, 4 or 8 bytes, not {n}")
        return n
    if kind == "ns":
        n = parse_int(v, file, step, fld)
        if not 0 <= n <= MAX_ADVANCE_NS:
            raise _err(file, step, fld, f"0 to {MAX_ADVANCE_NS} ns (an hour), not {n}")
        return n
    if kind == "name":
        if not isinstance(v, str) or not v:
            raise _err(file, step, fld, f"expected a name, got {v!r}")
        return v
    if kind == "events":
        if not isinstance(v, dict):
            raise _err(file, step, fld, "expected a table of struct kvm_vcpu_events fields")
        out = {}
        for k, x in v.items():
            if k not in EVENT_FIELDS:
                raise _err(file, step, f"{fld}.{k}", f"not a field of kvm_vcpu_events "
                                                     f"(fields: {', '.join(EVENT_FIELDS)})")
            out[k] = _parse_value("u64" if k == "exception_payload" else "u32", x, file, step,
                                  f"{fld}.{k}")
        return out
    if kind == "pit":
        from .i8254 import CHANNEL_FIELDS

        if not isinstance(v, dict):
            raise _err(file, step, fld, "expected a table: ch0/ch1/ch2 (channel fields), flags")
        out = {}
        for k, x in v.items():
            if k == "flags":
                out[k] = _parse_value("u32", x, file, step, f"{fld}.flags")
            elif k in ("ch0", "ch1", "ch2") and isinstance(x, dict):
                ch = {}
                for f, y in x.items():
                    if f not in CHANNEL_FIELDS:
                        known = ", ".join(CHANNEL_FIELDS)
                        raise _err(file, step, f"{fld}.{k}.{f}",
                                   f"not a kvm_pit_channel_state field ({known})")
                    ch[f] = parse_int(y, file, step, f"{fld}.{k}.{f}")
                out[k] = ch
            else:
                raise _err(file, step, f"{fld}.{k}", "expected ch0, ch1, ch2 (tables) or flags")
        return out
    if kind == "routes":
        if not isinstance(v, list):
            raise _err(file, step, fld, "expected a list of route tables")
        return tuple(_parse_route(x, file, step, f"{fld}[{i}]") for i, x in enumerate(v))
    if kind == "inhibit":
        try:
            return ApicvInhibit.parse(v).name
        except ValueError as e:
            raise _err(file, step, fld, str(e)) from None
    if kind == "vcpu":
        n = parse_int(v, file, step, fld)
        if n < 0:
            raise _err(file, step, fld, "vCPU ids are >= 0")
        return n
    if kind == "bool":
        if not isinstance(v, bool):
            raise _err(file, step, fld, f"expected true or false, got {v!r}")
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise _err(file, step, fld, f"expected a string, got {v!r}")
        return v
    if kind == "reg":
        return _parse_reg(v, file, step, fld)
    if kind == "msr":
        n = parse_int(v, file, step, fld, MSR_NAMES)
        if not 0 <= n <= 0xFFFFFFFF:
            raise _err(file, step, fld, f"MSR index {n:#x} does not fit in 32 bits")
        return n
    if kind == "mp_state":
        return parse_int(v, file, step, fld, MP_STATES)
    if kind == "cap":
        return parse_int(v, file, step, fld, CAPS)
    if kind == "ints":
        if not isinstance(v, list):
            raise _err(file, step, fld, "expected a list of integers")
        return [_parse_value("u64", x, file, step, fld) for x in v]
    if kind == "regs":
        return parse_regs(v, file, step, fld)
    if kind == "chip":
        return parse_int(v, file, step, fld, CHIPS)
    if kind == "chipfields":
        if not isinstance(v, dict):
            raise _err(file, step, fld, "expected a table of field = value")
        return {k.lower(): parse_int(x, file, step, f"{fld}.{k}") for k, x in v.items()}
    if kind in NESTED_KINDS:
        return parse_nested(kind, v, file, step, fld)
    raise AssertionError(kind)


def _parse_route(v: Any, file, step, fld) -> MsiRoute | IrqchipRoute:
    """{gsi, address_lo, address_hi?, data?, devid?} (MSI) or {gsi, irqchip, pin}."""
    if not isinstance(v, dict):
        raise _err(file, step, fld, "expected a table (gsi and address_lo/data, or irqchip/pin)")
    msi = {"gsi", "address_lo", "address_hi", "data", "devid"}
    chip = {"gsi", "irqchip", "pin"}
    keys = set(v)
    if not keys <= msi and not keys <= chip:
        raise _err(file, step, fld, f"unknown fields {sorted(keys - msi - chip)} (an MSI route "
                                    "has gsi, address_lo, address_hi, data, devid; an irqchip "
                                    "route gsi, irqchip, pin)")
    need = {"gsi", "address_lo"} if keys <= msi and "irqchip" not in keys else chip
    if not need <= keys:
        raise _err(file, step, fld, f"missing {sorted(need - keys)}")
    vals = {k: (parse_int(x, file, step, f"{fld}.{k}", CHIPS) if k == "irqchip"
                else _parse_value("u32", x, file, step, f"{fld}.{k}")) for k, x in v.items()}
    return MsiRoute(**vals) if "address_lo" in vals else IrqchipRoute(**vals)


def parse_vectors(v: Any, file, step, fld) -> int:
    if not isinstance(v, list):
        raise _err(file, step, fld, "expected a list of vectors")
    bits = 0
    for x in v:
        n = parse_int(x, file, step, fld)
        if not 0 <= n <= 255:
            raise _err(file, step, fld, f"vector {n} out of range 0-255")
        bits |= 1 << n
    return bits


def parse_regs(v: Any, file, step, fld) -> dict[str, int]:
    """A table of register name -> value (IRR/ISR/TMR take vector lists)."""
    if not isinstance(v, dict):
        raise _err(file, step, fld, "expected a table of register = value")
    out: dict[str, int] = {}
    for k, val in v.items():
        sub = f"{fld}.{k}"
        name = k.upper()
        if name in ("IRR", "ISR", "TMR"):
            out[name] = parse_vectors(val, file, step, sub)
            continue
        try:
            lookup(k)
        except KeyError:
            raise _err(file, step, sub, f"unknown register {k!r}") from None
        out[k] = _parse_value("u32", val, file, step, sub)  # a 32-bit register
    return out


def _parse_flags(v: Any, file: str, fld: str, names: dict[str, int]) -> int:
    if isinstance(v, list):
        flags = 0
        for name in v:
            flags |= parse_int(name, file, None, fld, names)
        return flags
    return parse_int(v, file, None, fld, names)


def parse_vm_table(t: Any, file: str) -> VmConfig:
    """A scenario's [vm] table as a VmConfig (each field named in an error)."""
    if t is None:
        return VmConfig()
    if not isinstance(t, dict):
        raise _err(file, None, "vm", "expected a table")
    out: dict[str, Any] = {}
    for k, v in t.items():
        kind = VM_OPTIONS.get(k)
        fld = f"vm.{k}"
        if kind is None:
            raise _err(file, None, fld, f"unknown VM option (known: {', '.join(VM_OPTIONS)})")
        if kind == "x2apic_api":
            v = _parse_flags(v, file, fld, X2APIC_API_FLAGS)
        elif kind == "quirks":
            v = _parse_flags(v, file, fld, QUIRKS)
        elif kind == "int":
            v = parse_int(v, file, None, fld)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise _err(file, None, fld, "expected true or false")
        elif kind == "ints":
            if not isinstance(v, list):
                raise _err(file, None, fld, "expected a list")
            v = tuple(parse_int(x, file, None, fld) for x in v)
        elif kind in ("irqchip", "vm_type") and not isinstance(v, str | int):
            raise _err(file, None, fld, "expected a name")
        out["nr_vcpus" if k == "vcpus" else k] = v
    try:
        return VmConfig(**out)
    except ValueError as e:
        name = str(e).split("=", 1)[0]
        raise _err(file, None, "vm." + ("vcpus" if name == "nr_vcpus" else name),
                   str(e)) from None


def parse(text: str, file: str = "<scenario>") -> Scenario:
    """Parse and validate a scenario; any defect is a :class:`ScenarioError` naming *file*
    (a document nested too deeply for the parser, e.g. ``x = [[[...]]]`` or an ``expect``
    table hundreds deep, included)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _err(file, None, None, f"not valid TOML: {e}") from None
    except RecursionError:
        raise _err(file, None, None, "not valid TOML: nested too deeply") from None
    try:
        return parse_doc(doc, file)
    except RecursionError:
        raise _err(file, None, None, "nested too deeply") from None


def parse_doc(doc: dict[str, Any], file: str = "<scenario>") -> Scenario:
    """Validate a scenario given as the table TOML would produce."""
    sc = parse_head(doc, file)
    steps = doc.get("step", [])
    if not isinstance(steps, list):
        raise _err(file, None, "step", "use [[step]] tables")
    check = StepChecker(sc)
    for i, t in enumerate(steps, 1):
        sc.steps.append(check(i, t))
    return sc


def parse_head(doc: dict[str, Any], file: str) -> Scenario:
    """A scenario's top level without its steps: the keys, ``description`` and ``[vm]``."""
    for k in doc:
        if k not in ("description", "vm", "step"):
            raise _err(file, None, k, "unknown top-level key (expected description, vm, step)")
    return Scenario(file, str(doc.get("description", "")), parse_vm_table(doc.get("vm"), file))


class StepChecker:
    """Validates a scenario's steps one at a time and in order, keeping only what a step may
    refer to across steps: the vCPUs an enable_nested step gave VMX so far and the names
    get_lapic steps saved states under (a set_lapic ``from`` must name one of them)."""

    def __init__(self, sc: Scenario) -> None:
        self.file = sc.file
        self.vm_type = sc.vm.vm_type
        self.ids = list(sc.vm.ids)
        self.nested_ids: set[int] = set()
        self.saved: set[str] = set()

    def __call__(self, i: int, t: Any) -> Step:
        """Step *i* (1-based) from its table *t*; a defect is a ScenarioError naming it."""
        file = self.file
        if not isinstance(t, dict):
            raise _err(file, i, None, "a step must be a table")
        op = t.get("do")
        if op is None:
            raise _err(file, i, "do", "missing (which method to call)")
        if op not in OPS:
            raise _err(file, i, "do", f"unknown operation {op!r} (known: {', '.join(OPS)})")
        spec = OPS[op].fields
        args: dict[str, Any] = {}
        st = Step(i, op, args)
        for k, v in t.items():
            if k in COMMON:
                continue
            if k not in spec:
                raise _err(file, i, k, f"unknown field for {op} (fields: "
                                       f"{', '.join(list(spec) + sorted(COMMON))})")
            args[k] = _parse_value(spec[k][0], v, file, i, k)
        for k, (_, required) in spec.items():
            if required and k not in args:
                raise _err(file, i, k, f"missing (required by {op})")
        if "vcpu" in args and args["vcpu"] not in self.ids:
            raise _err(file, i, "vcpu", f"no vCPU {args['vcpu']} (the VM has {self.ids})")
        if op in NESTED_OPS:
            check_nested_step(op, args, self.nested_ids, self.vm_type, file, i)
        if op == "set_irqchip":
            _check_chip_fields(args["chip"], args["patch"], file, i, "patch")
        if op == "get_lapic":
            st.save = args.get("save")
        if op == "set_lapic":
            if ("from" in args) == ("file" in args):
                raise _err(file, i, "from", "set_lapic needs exactly one of 'from' or 'file'")
            if "from" in args and args["from"] not in self.saved:
                raise _err(file, i, "from", f"no state saved as {args['from']!r} by an "
                                            "earlier get_lapic step")
            if "file" in args:
                args["page"] = _load_state_file(file, i, args["file"])
        if op == "write_guest" and not args["value"] < 1 << (8 * args.get("size", 4)):
            raise _err(file, i, "value", f"{args['value']:#x} does not fit in "
                                         f"{args.get('size', 4)} bytes")
        if "expect" in t:
            st.has_expect = True
            st.expect = _parse_expect(op, t["expect"], file, i)
            if op == "get_irqchip":
                _check_chip_fields(args["chip"], st.expect, file, i, "expect")
        if "expect_fault" in t:
            st.expect_fault = parse_int(t["expect_fault"], file, i, "expect_fault")
        if "expect_errno" in t:
            st.expect_errno = parse_int(t["expect_errno"], file, i, "expect_errno",
                                        {n: v for v, n in _errno.errorcode.items()})
        if "expect_vmfail" in t:
            if op not in ("vmlaunch", "vmresume"):
                raise _err(file, i, "expect_vmfail", "only vmlaunch and vmresume can VMfail")
            st.expect_vmfail = _parse_value("u32", t["expect_vmfail"], file, i,
                                            "expect_vmfail")
        st.note = str(t.get("note", ""))
        if st.save is not None:
            self.saved.add(st.save)
        return st


def _check_chip_fields(chip: int, table: dict[str, int], file, i, fld) -> None:
    names = chip_fields(chip)
    for k, val in table.items():
        if k not in names:
            raise _err(file, i, f"{fld}.{k}", f"unknown field (known: {', '.join(names[:6])}"
                                              f"{', rte0..rte23' if len(names) > 16 else ''}"
                                              f"{', ...' if len(names) <= 16 else ''})")
        width = 64 if k.startswith("rte") or k == "base_address" else (
            32 if chip == U.KVM_IRQCHIP_IOAPIC else 8)
        if not 0 <= val < 1 << width:
            raise _err(file, i, f"{fld}.{k}", f"{val:#x} does not fit in {width} bits")


def _load_state_file(file: str, i: int, path: str) -> bytes:
    """A set_lapic step's state file, read when the scenario is parsed."""
    full = _relative(file, path)
    try:
        return bytes(LapicState.load(full))
    except (StateError, OSError, ValueError) as e:
        raise _err(file, i, "file", f"{path}: {e}") from None


def _parse_expect(op: str, v: Any, file: str, i: int) -> Any:
    kind = OPS[op].expect
    if kind == "regs":
        return parse_regs(v, file, i, "expect")
    if kind == "chipfields":
        return _parse_value("chipfields", v, file, i, "expect")
    if kind == "vectors":
        if not isinstance(v, list):
            raise _err(file, i, "expect", "expected a list of vectors")
        return [parse_int(x, file, i, "expect") for x in v]
    if kind == "mp_state":
        return parse_int(v, file, i, "expect", MP_STATES)
    if kind == "location":
        if v not in LOCATIONS:
            raise _err(file, i, "expect", f"one of {', '.join(map(repr, LOCATIONS))}")
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise _err(file, i, "expect", "expected true or false")
        return v
    if kind == "events":
        return _parse_value("events", v, file, i, "expect")
    if kind == "pit":
        return _parse_value("pit", v, file, i, "expect")
    if kind in NESTED_KINDS:
        return parse_nested(kind, v, file, i, "expect")
    if kind == "sregs":
        if not isinstance(v, dict) or not set(v) <= {"apic_base", "cr8"}:
            raise _err(file, i, "expect", "expected a table of apic_base and/or cr8")
        return {k: _parse_value("u64", x, file, i, f"expect.{k}") for k, x in v.items()}
    if kind == "exits":
        if not isinstance(v, list) or not all(
                isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) for x in v):
            raise _err(file, i, "expect", 'expected a list of ["NAME", value] pairs')
        return [(x[0], parse_int(x[1], file, i, "expect")) for x in v]
    return parse_int(v, file, i, "expect")


LIMIT = 256 << 20  # the largest scenario file read (a million steps are ~60 MiB)


def open_scenario_file(path: str):
    """*path* opened for reading (binary) and its fstat: a regular file of at most LIMIT
    bytes; a directory, a FIFO (which would block) or /dev/zero (which never ends) is refused
    before anything is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ScenarioError(path, None, None, f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ScenarioError(path, None, None, "cannot read: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ScenarioError(path, None, None, "cannot read: not a regular file")
        if st.st_size > LIMIT:
            raise ScenarioError(path, None, None, f"{st.st_size} bytes: larger than "
                                f"{LIMIT >> 20} MiB")
        return open(fd, "rb"), st  # noqa: SIM115 -- the caller closes it
    except BaseException:
        os.close(fd)
        raise


def load(path: str) -> Scenario:
    """Read and parse a scenario file: a regular UTF-8 file of at most 256 MiB (a million
    steps are ~60 MiB); a directory, a FIFO (which would block) or /dev/zero (which never
    ends) is refused before it is read. The whole file is held at once: :func:`stream` keeps
    a step at a time."""
    f, _ = open_scenario_file(path)
    try:
        with f:
            data = f.read(LIMIT + 1)
    except OSError as e:
        raise ScenarioError(path, None, None, f"cannot read: {e.strerror}") from None
    if len(data) > LIMIT:
        raise ScenarioError(path, None, None, f"larger than {LIMIT >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScenarioError(path, None, None, "not a UTF-8 text file") from None
    del data
    return parse(text, path)


# ---------------------------------------------------------------- running
@dataclass
class Outcome:
    """What one step did: its return value or the error it raised, and a failed expectation."""

    step: Step
    value: Any = None
    error: ApicvError | None = None
    failure: str | None = None
    skipped: str | None = None  # not run on this backend (and the run stops here)

    def result_text(self) -> str:
        if self.skipped is not None:
            return "not run"
        if self.error is not None:
            if isinstance(self.error, GuestFault):
                return f"guest fault vector {self.error.vector}"
            if isinstance(self.error, KvmError):
                return f"{self.error.ioctl} -> {self.error.errno_name}"
            return f"{type(self.error).__name__}: {self.error}"
        v = self.value
        if self.step.op == "get_lapic":
            return "1024-byte state"
        if isinstance(v, bytes):
            return f"{len(v)}-byte state {v.hex()}"
        if self.step.op == "get_mp_state" and isinstance(v, int):
            return U.MP_STATE_NAMES.get(v, str(v))
        if isinstance(v, list):
            return _fmt(v)
        if isinstance(v, bool) or v is None:
            return str(v)
        if isinstance(v, int):
            return f"{v:#x}"
        return str(v)


def _patched(base: bytes, patch: dict[str, int]) -> bytes:
    s = LapicState(base)
    for k, v in patch.items():
        if k in ("IRR", "ISR", "TMR"):
            s.set_vectors(k, v)
        else:
            s[k] = v
    return bytes(s)


def check_state_expect(page: bytes, expect: dict[str, int]) -> str | None:
    s = LapicState(page)
    bad = []
    for k, want in expect.items():
        if k in ("IRR", "ISR", "TMR"):
            got = s.get_vectors(k)
            if got != want:
                bad.append(f"{k} = {[hex(x) for x in vectors_of(got)]}, expected "
                           f"{[hex(x) for x in vectors_of(want)]}")
        elif s[k] != want:
            bad.append(f"{k} = {s[k]:#x}, expected {want:#x}")
    return "; ".join(bad) or None


class Runner:
    """Runs a scenario's steps one at a time on one VM (any backend)."""

    def __init__(self, scenario: Scenario | ScenarioStream, vm) -> None:
        self.sc = scenario
        self.vm = vm
        self.saved: dict[str, bytes] = {}
        self.eventfds: dict[str, int] = {}  # the scenario's named eventfds (irqfds)

    def eventfd(self, name: str) -> int:
        """The eventfd a scenario calls *name* (created, non-blocking, on first use)."""
        fd = self.eventfds.get(name)
        if fd is None:
            fd = self.eventfds[name] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd

    def close(self) -> None:
        """Close the scenario's eventfds (a run closes them when it ends)."""
        fds, self.eventfds = self.eventfds, {}
        for fd in fds.values():
            os.close(fd)

    def call(self, st: Step) -> Any:
        """Carry out one step (its row of OP_TABLE) on the VM or on the vCPU it names."""
        op = OPS[st.op]
        a = st.args
        target = self.vm.vcpu(a["vcpu"]) if op.target == "vcpu" else self.vm
        return op.call(self, target, a)

    def lapic_page(self, a: dict[str, Any]) -> bytes:
        """The page a set_lapic step loads: a saved or file state with its patch applied."""
        if "from" in a:
            if a["from"] not in self.saved:
                raise ValueError(f"no state saved as {a['from']!r} by an earlier step")
            base = self.saved[a["from"]]
        else:
            base = a["page"]
        return _patched(base, a.get("patch", {}))

    def step(self, st: Step) -> Outcome:
        out = Outcome(st)
        try:
            out.value = self.call(st)
        except ScenarioError:
            raise
        except ApicvError as e:
            out.error = e
        except ValueError as e:
            raise ScenarioError(self.sc.file, st.index, None, str(e)) from None
        out.failure = self.check(st, out)
        return out

    @staticmethod
    def check(st: Step, out: Outcome) -> str | None:
        e = out.error
        if st.expect_vmfail is not None:
            return check_vmfail(e, st.expect_vmfail, out.result_text())
        if st.expect_fault is not None:
            if not isinstance(e, GuestFault) or e.vector != st.expect_fault:
                return f"expected guest fault {st.expect_fault}, got {out.result_text()}"
            return None
        if st.expect_errno is not None:
            if not isinstance(e, KvmError) or e.errno != st.expect_errno:
                return (f"expected errno {_errno.errorcode.get(st.expect_errno)}, "
                        f"got {out.result_text()}")
            return None
        if e is not None:
            return f"unexpected error: {out.result_text()}"
        if st.has_expect:
            kind = OPS[st.op].expect
            if kind in NESTED_KINDS:
                return check_nested(kind, out.value, st.expect, out.result_text())
            if kind == "regs":
                return check_state_expect(out.value, st.expect)
            if kind == "pit":
                from .i8254 import unpack_pit_state2

                got = unpack_pit_state2(out.value)
                bad = [f"flags = {got['flags']:#x}, expected {st.expect['flags']:#x}"
                       ] if "flags" in st.expect and got["flags"] != st.expect["flags"] else []
                for i, ch in enumerate(got["channels"]):
                    bad += [f"ch{i}.{f} = {ch[f]:#x}, expected {w:#x}"
                            for f, w in st.expect.get(f"ch{i}", {}).items() if ch[f] != w]
                return "; ".join(bad) or None
            if kind in ("events", "sregs"):
                bad = [f"{k} = {getattr(out.value, k):#x}, expected {w:#x}"
                       for k, w in st.expect.items() if getattr(out.value, k) != w]
                return "; ".join(bad) or None
            if kind == "chipfields":
                got = decode_irqchip(st.args["chip"], out.value)
                bad = [f"{k} = {got[k]:#x}, expected {w:#x}" for k, w in st.expect.items()
                       if got[k] != w]
                return "; ".join(bad) or None
            if out.value != st.expect:
                return f"returned {out.result_text()}, expected {_fmt(st.expect)}"
        return None

    def run(self) -> Iterator[Outcome]:
        """Every step's outcome; on a backend that cannot take a model-only step (a vCPU
        resting in guest mode or HLT), that step is reported as skipped and the run ends."""
        model = getattr(self.vm, "backend", "model") == "model"
        try:
            for st in self.sc.iter_steps():
                if not model and st.op in MODEL_ONLY_OPS:
                    yield Outcome(st, skipped=f"{st.op} is model-only on the {self.vm.backend} "
                                              f"backend ({model_only_reason(st.op)}); the "
                                              "run stops here")
                    return
                yield self.step(st)
        finally:
            self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:#x}"
    return str(v)


def _relative(base_file: str, path: str) -> str:
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(base_file)), path)
