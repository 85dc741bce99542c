#!/usr/bin/env python3
"""Check the seams between apicv's modules (standard library only).

Walks ``src/apicv/**/*.py`` with :mod:`ast` and reports, as ``file:line: what``:

* every foreign private access: ``x._name`` where ``x`` is not ``self``, ``cls`` or
  ``super()``, and every ``from m import _name`` (``__dunder__`` names are fine; so is a
  public name imported under a private alias, ``from m import name as _name``);
* every module over 800 lines, and every module over 600 lines whose module docstring has no
  sentence starting with "Why this module is long:".

Exit status 1 if there is any finding, else 0; a one-line summary is printed last.

Usage: ``python tools/check_seams.py [ROOT ...]`` (default: ``src/apicv`` beside this tool).
"""

from __future__ import annotations

import ast
import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_LINES = 800
EXPLAIN_LINES = 600
WHY_LONG = "Why this module is long:"
OWN_NAMES = frozenset({"self", "cls"})

_WHY_LONG_RE = re.compile(r"(?:\A|[.!?:]\s+|\n\s*(?:[*-]\s+)?)" + re.escape(WHY_LONG))


@dataclass(frozen=True)
class Finding:
    """One problem: where it is, what kind (``private`` or ``length``), and what it says."""

    path: str
    line: int
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


def is_private(name: str) -> bool:
    """``_x`` and ``__x`` are private; ``__x__`` (a dunder) is not."""
    if not name.startswith("_"):
        return False
    return not (len(name) > 4 and name.startswith("__") and name.endswith("__"))


def is_own(node: ast.expr) -> bool:
    """Whether *node* is ``self``, ``cls`` or ``super()``: the object's own names."""
    if isinstance(node, ast.Name):
        return node.id in OWN_NAMES
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id == "super"
    return False


def find_private_access(source: str, path: str = "<string>") -> list[Finding]:
    """Foreign private accesses in *source*: ``x._name`` (x not self/cls/super()) and
    ``from m import _name``."""
    tree = ast.parse(source, filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if is_private(node.attr) and not is_own(node.value):
                found.append(Finding(path, node.lineno, "private", ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            for alias in node.names:
                if is_private(alias.name):
                    found.append(Finding(path, node.lineno, "private",
                                         f"from {module} import {alias.name}"))
    found.sort(key=lambda f: (f.line, f.text))
    return found


def explains_length(docstring: str | None) -> bool:
    """Whether a module docstring has a sentence starting with "Why this module is long:"."""
    return bool(docstring) and _WHY_LONG_RE.search(docstring) is not None


def check_length(source: str, path: str = "<string>") -> list[Finding]:
    """Over MAX_LINES lines is an error; over EXPLAIN_LINES lines needs the docstring's
    "Why this module is long:" sentence."""
    n = len(source.splitlines())
    if n > MAX_LINES:
        return [Finding(path, 1, "length", f"{n} lines (the limit is {MAX_LINES})")]
    if n > EXPLAIN_LINES:
        doc = ast.get_docstring(ast.parse(source, filename=path), clean=False)
        if not explains_length(doc):
            return [Finding(path, 1, "length",
                            f"{n} lines (over {EXPLAIN_LINES}) and the module docstring has "
                            f"no sentence starting {WHY_LONG!r}")]
    return []


def check_source(source: str, path: str = "<string>") -> list[Finding]:
    """Every finding for one module's source."""
    return check_length(source, path) + find_private_access(source, path)


def python_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def check_tree(roots: list[Path], relative_to: Path | None = None) -> tuple[list[Finding], int]:
    """Every finding under *roots* and the number of files checked."""
    findings: list[Finding] = []
    files = [f for root in roots for f in python_files(root)]
    for f in files:
        shown = f
        if relative_to is not None:
            with contextlib.suppress(ValueError):  # outside it: shown as given
                shown = f.resolve().relative_to(relative_to.resolve())
        source = f.read_text(encoding="utf-8")
        try:
            findings += check_source(source, str(shown))
        except SyntaxError as e:
            findings.append(Finding(str(shown), e.lineno or 1, "syntax", f"syntax error: {e.msg}"))
    return findings, len(files)


def summary(findings: list[Finding], nfiles: int) -> str:
    if not findings:
        return f"check_seams: {nfiles} files, no findings"
    kinds: dict[str, int] = {}
    for f in findings:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    files = len({f.path for f in findings})
    n = len(findings)
    return f"check_seams: {n} finding{'s' * (n != 1)} ({detail}) in {files} of {nfiles} files"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    repo = Path(__file__).resolve().parent.parent
    roots = [Path(a) for a in args] or [repo / "src" / "apicv"]
    findings, nfiles = check_tree(roots, relative_to=Path.cwd())
    for f in findings:
        print(f)
    print(summary(findings, nfiles))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
