"""Scenario files read a step at a time (issue 12: a million-step scenario in memory bounded
by a step): scenario.stream checks the whole file first and gives the same steps, outcomes
and errors as the whole-document parse; `apicv run` reports a defect in the last step of a
big file before step 1 runs; a "[[step]]" line inside a multi-line string is not a split;
peak memory does not grow with the number of steps."""

from __future__ import annotations

import glob
import os
import random
import re
import subprocess
import sys
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from apicv import ScenarioError
from apicv.fuzz import case, to_toml
from apicv.scenario import Runner, load, parse
from apicv.scenario_stream import _fast_table, _pieces, stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.toml")))
APICV = [sys.executable, "-c", "import sys; from apicv.cli import main; sys.exit(main())"]


def outcomes(sc) -> list[tuple]:
    """What each step did (the fd number an error names depends on what else is open)."""
    return [(o.step, o.value, o.failure, o.skipped, re.sub(r"fd \d+", "fd N", str(o.error)))
            for o in Runner(sc, sc.make_vm()).run()]


def whole_or_error(path: str):
    try:
        sc = load(path)
    except ScenarioError as e:
        return "error", str(e)
    return sc.description, sc.vm, sc.steps


def streamed_or_error(path: str, pieces_expected: bool | None = None):
    try:
        s = stream(path, whole_below=0)
        if pieces_expected is not None:
            assert (s.whole is None) == pieces_expected
        steps = list(s.iter_steps())
    except ScenarioError as e:
        return "error", str(e)
    assert s.nsteps == len(steps)
    return s.description, s.vm, steps


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_stream_as_they_parse_whole(path):
    sc, s = load(path), stream(path, whole_below=0)
    assert s.whole is None  # read in pieces, not by falling back to the whole document
    assert (s.description, s.vm, s.nsteps) == (sc.description, sc.vm, len(sc.steps))
    assert list(s.iter_steps()) == sc.steps
    assert outcomes(s) == outcomes(sc)


def _mutate(text: str, rng: random.Random) -> str:
    """A random edit of a scenario's text: a bad value, a broken line, a TOML construct the
    fast line reader leaves to tomllib, a multi-line string holding a [[step]] line..."""
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    edits = [
        lambda ln: ln.replace("0", "0x1ffffffff", 1),
        lambda ln: ln + " # a comment",
        lambda ln: ln.replace(" = ", "=", 1),
        lambda ln: ln + "\r",
        lambda ln: ln.replace('"', "'"),
        lambda ln: ln + "x",
        lambda ln: 'note = """\n[[step]]\ndo = "nmi"\n"""',
        lambda ln: "note = '''\n[[step]]\n'''",
        lambda ln: 'note = "a \\" [[step]]"',
        lambda ln: "[vm]\nvcpus = 1",
        lambda ln: "[[step]]",
        lambda ln: "[step.expect]\nTPR = 0",
        lambda ln: "expect = [\n0x41,\n]",
        lambda ln: "bogus = 1",
        lambda ln: "value = 1_000",
        lambda ln: 'from = "nowhere"',
        lambda ln: "",
    ]
    lines[i] = rng.choice(edits)(lines[i])
    return "\n".join(lines)


def test_random_scenarios_stream_as_they_parse_whole(tmp_path):
    """fuzz's random scenarios, as written and with random edits (most make them invalid):
    the streamed steps, their outcomes and every error are those of the whole parse."""
    path = str(tmp_path / "s.toml")
    rng = random.Random(12)
    pieces_used = 0
    for i in range(300):
        text = to_toml(case(12, i, max_steps=12)[0])
        for _ in range(rng.randrange(3) if i % 3 else 0):
            text = _mutate(text, rng)
        with open(path, "w", newline="") as f:
            f.write(text)
        whole = whole_or_error(path)
        assert streamed_or_error(path) == whole, text
        if whole[0] != "error" and i % 10 == 0:
            sc, s = load(path), stream(path, whole_below=0)
            pieces_used += s.whole is None
            assert outcomes(s) == outcomes(sc), text
    assert pieces_used > 10


def test_scenario_in_pieces_with_every_toml_form(tmp_path):
    """Steps the fast line reader leaves to tomllib (arrays, inline and sub-tables, escapes,
    CRLF) and comments and blank lines around [[step]] lines."""
    text = ('description = "all forms"  # comment\n[vm]\nvcpus = 2\n\n# before\n'
            '[[step]]  # a comment\r\ndo = "mmio_write"\r\nvcpu = 0\r\noffset = "SPIV"\r\n'
            "value = 0x1FF\r\n\n"
            "[[step]]\ndo = 'get_lapic'\nvcpu = 0\nsave = 's'\n[step.expect]\nTPR = 0\n"
            "[[step]]\ndo = \"set_lapic\"\nvcpu = 1\nfrom = \"s\"\npatch = { TPR = 0x20 }\n"
            '[[step]]\ndo = "nmi"\nvcpu = +1\nnote = "tab\\there \\"quoted\\""\n'
            "[[step]]\ndo = \"take_interrupts\"\nvcpu = 0\nexpect = [\n]\n")
    path = tmp_path / "forms.toml"
    path.write_bytes(text.encode())
    assert streamed_or_error(str(path), pieces_expected=True) == whole_or_error(str(path))
    assert len(streamed_or_error(str(path))[2]) == 5


@pytest.mark.parametrize("string", [
    '"""\n[[step]]\ndo = "nmi"\nvcpu = 0\n"""',
    "'''\n[[step]]\ndo = 'nmi'\n'''",
    '"""a \\""" still open\n[[step]]\n""""',  # an escaped quote, then 4 quotes end it
    "'''x'''\n#'''",  # closed on its line; a triple quote in a comment opens nothing
])
def test_step_line_in_a_multiline_string_does_not_split(tmp_path, string):
    text = (f'[[step]]\ndo = "nmi"\nvcpu = 0\nnote = {string}\n'
            '[[step]]\ndo = "take_interrupts"\nvcpu = 0\n')
    assert len(list(_pieces(text.splitlines(keepends=True)))) == 3  # head and two steps
    path = tmp_path / "ml.toml"
    path.write_text(text)
    got = streamed_or_error(str(path), pieces_expected=True)
    assert got == whole_or_error(str(path))
    assert [st.op for st in got[2]] == ["nmi", "take_interrupts"]
    assert "[[step]]" in got[2][0].note or string.startswith("'''x")


LINE_PARTS = hs.sampled_from(["a", "do", "1", "-", "_", " ", "\t", "=", '"', "'", "\\", "#",
                              "0", "7", "x", "F", "+", ".", "true", "false", "[", "]", "{",
                              "}", ",", "\x01", "\x7f", "\u00e9", "\r", "0x", "_1", "e5"])


@settings(max_examples=3000, deadline=None)
@given(hs.lists(hs.lists(LINE_PARTS, max_size=12).map("".join), max_size=4))
def test_fast_line_reader_reads_as_tomllib_or_declines(lines):
    text = "[[step]]\n" + "".join(ln + "\n" for ln in lines)
    fast = _fast_table(text.splitlines(keepends=True))
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert fast is None
        return
    if fast is not None:
        assert fast == doc["step"][0]
        assert [type(v) for v in fast.values()] == [type(v) for v in doc["step"][0].values()]


def _write_steps(path, n: int, last: str | None = None) -> None:
    with open(path, "w") as f:
        f.write('description = "many steps"\n[vm]\nvcpus = 1\n')
        for i in range(n):
            f.write(f'[[step]]\ndo = "mmio_write"\nvcpu = 0\noffset = "TPR"\n'
                    f"value = {(i % 16) << 4}\n")
        if last is not None:
            f.write(last)


def test_defect_in_the_last_step_is_reported_before_step_1_runs(tmp_path):
    """A file past STREAM_MIN (read in pieces by `apicv run`) with a bad value in its last
    step: one line naming file, step and field, exit 2, and no step line printed -- and a
    second, good file given first is not run either."""
    big = tmp_path / "big.toml"
    n = 70_000  # ~4.4 MB
    _write_steps(big, n, last='[[step]]\ndo = "irq_line"\nirq = 0x100000000\nlevel = 1\n')
    assert os.path.getsize(big) > 4 << 20
    with pytest.raises(ScenarioError) as e:
        stream(str(big))
    assert (e.value.step, e.value.field) == (n + 1, "irq")
    good = EXAMPLES[0]
    r = subprocess.run([*APICV, "--plain", "run", good, str(big)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""  # nothing ran
    (line,) = r.stderr.strip().splitlines()
    assert str(big) in line and f"step {n + 1}" in line and "irq" in line, line


def test_file_changed_between_check_and_run(tmp_path):
    path = tmp_path / "s.toml"
    _write_steps(path, 50)
    s = stream(str(path), whole_below=0)
    _write_steps(path, 50, last='[[step]]\ndo = "nmi"\nvcpu = 0\n')
    with pytest.raises(ScenarioError, match="changed since it was checked"):
        list(s.iter_steps())


def test_set_lapic_from_a_name_no_earlier_step_saved_is_found_by_the_check(tmp_path):
    text = ('[[step]]\ndo = "get_lapic"\nvcpu = 0\nsave = "a"\n'
            '[[step]]\ndo = "set_lapic"\nvcpu = 0\nfrom = "a"\n'
            '[[step]]\ndo = "set_lapic"\nvcpu = 0\nfrom = "b"\n'
            '[[step]]\ndo = "get_lapic"\nvcpu = 0\nsave = "b"\n')
    path = tmp_path / "from.toml"
    path.write_text(text)
    for read in (lambda: parse(text, str(path)), lambda: stream(str(path), whole_below=0)):
        with pytest.raises(ScenarioError) as e:
            read()
        assert (e.value.step, e.value.field) == (3, "from"), str(e.value)


RSS_PROBE = """
import os, resource, sys
import apicv.scenario as S
from apicv.cli import main
S.STREAM_MIN = 0  # read in pieces however small
out = os.open(os.devnull, os.O_WRONLY)
os.dup2(out, 1)
status = main(["--plain", "run", sys.argv[1]])
print(status, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _peak_kib(path) -> int:
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    status, peak = r.stderr.split()[-2:]
    assert status == "0", r.stderr
    return int(peak)


def test_peak_memory_does_not_grow_with_the_steps(tmp_path):
    """`apicv run` of 10,000 and of 50,000 steps: the same peak RSS within a few MiB (the
    whole-document parse holds ~1 KiB a step: 40 MiB more)."""
    small, big = tmp_path / "10k.toml", tmp_path / "50k.toml"
    _write_steps(small, 10_000)
    _write_steps(big, 50_000)
    a, b = _peak_kib(small), _peak_kib(big)
    assert b - a < 6 << 10, (a, b)


def test_a_toml_error_after_a_bad_value_is_the_error_reported(tmp_path):
    """The whole-document parse reports a TOML error anywhere before a bad value earlier on;
    reading in pieces holds the first defect until every piece has parsed."""
    path = tmp_path / "two.toml"
    path.write_text('[[step]]\ndo = "irq_line"\nirq = 0x100000000\nlevel = 1\n'
                    '[[step]]\ndo = "nmi"\nvcpu = 0\n[[step]]\ndo = = "nmi"\n')
    whole = whole_or_error(str(path))
    assert whole[0] == "error" and "not valid TOML" in whole[1]
    assert streamed_or_error(str(path)) == whole
