"""Reading a scenario file a step at a time (``apicv run`` of a big file): memory bounded by a
step, the whole file still checked before any step runs. See the comment below for how a file
is cut into pieces and when it is read whole instead (:func:`apicv.scenario.load`).
"""

from __future__ import annotations

import io
import os
import re
import tomllib
from collections.abc import Iterator
from itertools import islice
from typing import Any

from .api import VmConfig
from .errors import ScenarioError
from .scenario import Scenario, Step, StepChecker, load, open_scenario_file, parse_head

# ---------------------------------------------------------------- streaming
# A file of [[step]] tables is read in pieces: the head (everything before the first
# "[[step]]" line: description, [vm]) and then each step's table, from its "[[step]]" line
# (at column 0, outside a multi-line string) to the next. Each piece is parsed on its own --
# by _fast_table when all its lines are "key = string/integer/boolean", else by tomllib --
# so that a run holds one step, not the file. Whatever this cannot read as a whole-document
# parse would (a piece that is not valid TOML alone, a head with steps, a piece with another
# top-level table, a file that is not UTF-8) is read whole instead, by load(): its result or
# its error is the whole-document parse's by construction.
STREAM_MIN = 4 << 20  # a smaller file is read whole

_STEP_LINE = re.compile(r"\[\[step\]\][ \t]*(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?(?:\r\n|\n)?")
# one line of a step's table that needs no TOML parser: blank, a comment, or a bare key with
# a basic string (no escapes), a literal string, a decimal or hex integer (no underscores)
# or a boolean; anything else (arrays, tables, floats, escapes, dotted keys) goes to tomllib
_FAST_LINE = re.compile(
    r"[ \t]*(?:([A-Za-z0-9_-]+)[ \t]*=[ \t]*"
    r"(?:\"([^\"\\\x00-\x08\x0a-\x1f\x7f]*)\"|'([^'\x00-\x08\x0a-\x1f\x7f]*)'"
    r"|([+-]?(?:0|[1-9][0-9]*))|0x([0-9A-Fa-f]+)|(true|false))[ \t]*)?"
    r"(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?(?:\r\n|\n)?")


class _ReadWhole(Exception):
    """The file cannot be read in pieces as it would be read whole."""


def _ml_string(line: str, delim: str | None) -> str | None:
    """The multi-line string (its delimiter) still open at the end of *line*, given the
    one open at its start (None: none). Only a line with a triple quote can change it."""
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if delim is not None:
            if c == "\\" and delim == '"""':
                i += 2
            elif line.startswith(delim, i):
                while i < n and line[i] == delim[0]:  # up to two quotes more end it too
                    i += 1
                delim = None
            else:
                i += 1
        elif c == "#":
            return None
        elif line.startswith('"""', i) or line.startswith("'''", i):
            delim = line[i:i + 3]
            i += 3
        elif c == '"':  # a basic string ends at the next quote not escaped
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
        elif c == "'":
            j = line.find("'", i + 1)
            i = n if j < 0 else j + 1
        else:
            i += 1
    return delim


def _pieces(lines) -> Iterator[list[str]]:
    """The head's lines, then each step's (see above)."""
    piece: list[str] = []
    delim = None
    for line in lines:
        if delim is None and line.startswith("[[step]]") and _STEP_LINE.fullmatch(line):
            yield piece
            piece = [line]
            continue
        piece.append(line)
        if '"""' in line or "'''" in line:
            delim = _ml_string(line, delim)
    yield piece


def _fast_table(piece: list[str]) -> dict[str, Any] | None:
    """The table of a step's piece as tomllib would read it, or None when a line is beyond
    _FAST_LINE (or a key is repeated)."""
    t: dict[str, Any] = {}
    for line in islice(piece, 1, None):
        m = _FAST_LINE.fullmatch(line)
        if m is None:
            return None
        key, s, lit, dec, hx, b = m.groups()
        if key is None:
            continue
        if key in t:
            return None
        t[key] = (s if s is not None else lit if lit is not None else
                  int(dec) if dec is not None else int(hx, 16) if hx is not None else
                  b == "true")
    return t


def _toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        raise _ReadWhole from None


class _StepTables:
    """The step tables of one piece after another (one a piece, unless a [[step]] line was
    not split on). A table _fast_table read (strings, integers, booleans: nothing a check
    changes) is kept by its lines for the next piece with the same lines -- a big scenario
    repeats its steps -- up to KEEP pieces."""

    KEEP = 1024

    def __init__(self) -> None:
        self.seen: dict[tuple[str, ...], dict[str, Any]] = {}

    def __call__(self, piece: list[str]) -> list[Any]:
        key = tuple(piece)
        t = self.seen.get(key)
        if t is None:
            t = _fast_table(piece)
            if t is None:
                doc = _toml("".join(piece))
                if doc.keys() != {"step"} or not isinstance(doc["step"], list):
                    raise _ReadWhole
                return doc["step"]
            if len(self.seen) >= self.KEEP:
                self.seen.clear()
            self.seen[key] = t
        return [t]


def _ident(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ScenarioStream:
    """A scenario file checked whole and run a step at a time (:func:`stream`): it has the
    head of a :class:`Scenario` (file, description, vm), the number of steps, and
    :meth:`iter_steps`, which reads, checks and yields the steps again one at a time."""

    def __init__(self, head: Scenario, nsteps: int, ident: tuple[int, ...] | None = None,
                 whole: Scenario | None = None) -> None:
        self.head = head
        self.nsteps = nsteps
        self.ident = ident
        self.whole = whole  # the scenario, when the file was read whole

    @classmethod
    def of(cls, sc: Scenario) -> ScenarioStream:
        return cls(sc, len(sc.steps), whole=sc)

    @property
    def file(self) -> str:
        return self.head.file

    @property
    def description(self) -> str:
        return self.head.description

    @property
    def vm(self) -> VmConfig:
        return self.head.vm

    def make_vm(self, backend: str = "model", **extra):
        return self.head.make_vm(backend, **extra)

    def iter_steps(self) -> Iterator[Step]:
        if self.whole is not None:
            yield from self.whole.steps
            return
        changed = ScenarioError(self.file, None, None, "changed since it was checked; "
                                "run it again")
        f, st = open_scenario_file(self.file)
        with io.TextIOWrapper(f, encoding="utf-8", newline="\n") as lines:
            if _ident(st) != self.ident:
                raise changed
            check = StepChecker(self.head)
            n = 0
            pieces = _pieces(lines)
            step_tables = _StepTables()
            try:
                next(pieces)  # the head
                for piece in pieces:
                    for t in step_tables(piece):
                        n += 1
                        yield check(n, t)
            except (_ReadWhole, UnicodeDecodeError, RecursionError):
                raise changed from None
        if n != self.nsteps:
            raise changed


def stream(path: str, whole_below: int | None = None) -> ScenarioStream:
    """Check a scenario file as :func:`load` does -- every step, with the same error for the
    same defect -- keeping no step: the pass reads the file in pieces (see above), and
    :meth:`ScenarioStream.iter_steps` reads it again to run it. A file under *whole_below*
    bytes (default STREAM_MIN), or one that cannot be read in pieces, is read whole by
    load()."""
    if whole_below is None:
        whole_below = STREAM_MIN
    f, st = open_scenario_file(path)
    with io.TextIOWrapper(f, encoding="utf-8", newline="\n") as lines:
        if st.st_size >= whole_below:
            try:
                head, n = _check_pieces(lines, path)
                if _ident(os.fstat(f.fileno())) != _ident(st):
                    raise ScenarioError(path, None, None, "changed while it was read")
                return ScenarioStream(head, n, _ident(st))
            except (_ReadWhole, UnicodeDecodeError):
                pass
            except OSError as e:
                raise ScenarioError(path, None, None, f"cannot read: {e.strerror}") from None
    return ScenarioStream.of(load(path))


def _check_pieces(lines, path: str) -> tuple[Scenario, int]:
    """Parse every piece and check every step in order: the head and the number of steps.
    The first defect is raised once every piece has parsed (a piece that does not is
    _ReadWhole), so that the error is the one a whole-document parse reports."""
    error: ScenarioError | None = None
    pieces = _pieces(lines)
    doc = _toml("".join(next(pieces)))
    if "step" in doc:
        raise _ReadWhole
    head = Scenario(path, "", VmConfig())
    check = None
    try:
        head = parse_head(doc, path)
        check = StepChecker(head)
    except ScenarioError as e:
        error = e
    n = 0
    step_tables = _StepTables()
    for piece in pieces:
        for t in step_tables(piece):
            n += 1
            if error is None:
                try:
                    check(n, t)
                except ScenarioError as e:
                    error = e
                except RecursionError:
                    error = ScenarioError(path, None, None, "nested too deeply")
    if error is not None:
        raise error
    return head, n
