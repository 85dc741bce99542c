"""tools/check_seams.py on small synthetic sources (the full-tree check is ``make lint``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_seams.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_seams", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_seams", mod)
    spec.loader.exec_module(mod)
    return mod


cs = _load()


def private(src: str) -> list[str]:
    return [f.text for f in cs.find_private_access(src)]


def test_foreign_private_attribute_is_flagged():
    assert private("def f(other):\n    return other._x\n") == ["other._x"]


def test_own_private_attribute_is_not():
    src = (
        "class C:\n"
        "    def f(self):\n"
        "        self._x = 1\n"
        "        return self.__y\n"
        "    @classmethod\n"
        "    def g(cls):\n"
        "        return cls._z\n"
        "    def h(self):\n"
        "        return super()._w()\n"
    )
    assert private(src) == []


def test_dunder_is_fine():
    assert private("n = type(x).__name__\nd = x.__dict__\n") == []


def test_private_import_is_flagged():
    src = "from m import _y\nfrom .pkg import ok, _z\nimport os\nfrom m import a as _a\n"
    assert private(src) == ["from m import _y", "from .pkg import _z"]


def test_chained_and_subscripted_receivers_are_flagged():
    src = "a = self.clock._queue\nb = q[0][3]._gen\nc = mod._helper()\n"
    assert private(src) == ["self.clock._queue", "q[0][3]._gen", "mod._helper"]


def test_findings_carry_file_and_line():
    (f,) = cs.find_private_access("x = 1\ny = timer._gen\n", "src/apicv/clock.py")
    assert str(f) == "src/apicv/clock.py:2: timer._gen"


def _module(n_lines: int, doc: str) -> str:
    head = f'"""{doc}"""\n'
    return head + "x = 1\n" * (n_lines - head.count("\n"))


def test_short_module_needs_no_reason():
    assert cs.check_length(_module(600, "Short.")) == []


def test_long_module_without_reason_is_flagged():
    (f,) = cs.check_length(_module(601, "A module."))
    assert f.kind == "length" and "601 lines" in f.text


def test_long_module_with_reason_passes():
    doc = "A module.\n\nWhy this module is long: it models one C file."
    assert cs.check_length(_module(700, doc)) == []
    assert cs.check_length(_module(700, "Why this module is long: one C file.")) == []


def test_reason_must_start_a_sentence():
    assert cs.check_length(_module(700, "It says Why this module is long: in passing.")) != []


def test_over_800_is_flagged_whatever_the_docstring():
    (f,) = cs.check_length(_module(801, "Why this module is long: no excuse."))
    assert "801 lines" in f.text


@pytest.mark.parametrize("findings, status", [(True, 1), (False, 0)])
def test_main_exit_status_and_summary(tmp_path, capsys, findings, status):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f(o):\n    return o._p\n" if findings else "x = 1\n")
    (pkg / "b.py").write_text("y = 2\n")
    assert cs.main([str(pkg)]) == status
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("check_seams: ")
    if findings:
        assert out[0].endswith("a.py:2: o._p")
        assert out[-1] == "check_seams: 1 finding (1 private) in 1 of 2 files"
    else:
        assert out == ["check_seams: 2 files, no findings"]
