"""The README tells the truth: every ```python block runs as written (each on its own, as a
reader would paste it), and a ``# -> value`` comment on a line of one is checked against the
value of that line's expression. A block whose first line is ``# needs /dev/kvm`` is skipped
without a usable /dev/kvm; one whose first line is ``# not run`` is never run (use sparingly).

The value in ``# -> value`` ends at ``: ``, ``; ``, `` (`` or `` --``; if it is not a Python
literal (``# -> KVM_MP_STATE_HALTED``), the line is only run. Numbers the prose states are
checked where they come from the code (the demo's VM-exit counts); test counts, which change
with every test, are not stated at all."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
NEEDS_KVM = "# needs /dev/kvm"
NOT_RUN = "# not run"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


BLOCKS = python_blocks(README)


def claims(src: str) -> dict[int, str]:
    """line number -> the text after '->' in that line's comment."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and "-> " in tok.string:
            out[tok.start[0]] = tok.string.split("-> ", 1)[1]
    return out


def expected(claim: str):
    """The literal a claim states, or None if it states none."""
    text = re.split(r": |; | \(| --", claim, maxsplit=1)[0].strip()
    try:
        return (ast.literal_eval(text),)
    except (ValueError, SyntaxError):
        return None


def run_block(src: str, where: str) -> int:
    """Run *src* statement by statement; return how many claims were checked."""
    tree = ast.parse(src)
    said = claims(src)
    ns: dict = {"__name__": "__readme__"}
    checked = 0
    body = tree.body
    for i, stmt in enumerate(body):
        line = stmt.end_lineno
        last_on_line = i + 1 == len(body) or body[i + 1].lineno > line
        claim = said.get(line) if last_on_line else None
        want = expected(claim) if claim is not None else None
        if want is not None and isinstance(stmt, ast.Expr):
            got = eval(compile(ast.Expression(stmt.value), where, "eval"), ns)
            assert got == want[0], f"{where}, line {line}: {got!r}, the README says {claim!r}"
            checked += 1
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), where, "exec"), ns)
    return checked


def _kvm_ok() -> bool:
    from apicv.kvm import kvm_available

    return kvm_available()[0]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("line,src", BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_python_block_runs_as_written(line, src):
    first = src.lstrip().splitlines()[0] if src.strip() else ""
    if first.startswith(NOT_RUN):
        pytest.skip("marked not run")
    if first.startswith(NEEDS_KVM) and not _kvm_ok():
        pytest.skip("needs /dev/kvm")
    run_block(src, f"README.md:{line}")


def test_claims_are_checked():
    """The checker sees the README's claims (and would catch a wrong one)."""
    n = sum(run_block(src, f"README.md:{line}") for line, src in BLOCKS
            if not src.lstrip().startswith((NOT_RUN, NEEDS_KVM)))
    assert n >= 10
    with pytest.raises(AssertionError, match="the README says"):
        run_block("1 + 1   # -> 3: wrong\n", "x")
    assert expected("KVM_MP_STATE_INIT_RECEIVED (2)") is None
    assert expected("-1: waiting") == (-1,)


def test_demo_exit_counts_in_the_readme():
    """"APICv on: N exits, off: M" is what `apicv demo` prints."""
    from importlib import resources

    from apicv.cli import exit_comparison
    from apicv.scenario import parse

    m = re.search(r"APICv on: (\d+) exits, off: (\d+)", README)
    assert m, "the README no longer states the demo's exit counts"
    sc = parse(resources.files("apicv").joinpath("data/demo.toml").read_text(), "demo.toml")
    _headers, rows = exit_comparison(sc)
    total = next(r for r in rows if r[0] == "total")
    assert (total[2], total[3]) == m.groups()


def test_no_exact_test_counts():
    """A test count in prose is stale at the next test: the README states none."""
    assert not re.search(r"\b\d[\d,]{2,} tests\b", README), "an exact test count"


def test_tables_have_headers():
    """Every run of table rows starts with a header and its |---| line (no stray row after
    a table's prose)."""
    lines = README.splitlines()
    in_code = False
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            in_code = not in_code
        if not in_code and lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            assert j - i >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1]), (
                f"README.md:{i + 1}: table rows without a header: {lines[i]!r}")
            i = j
            continue
        i += 1
