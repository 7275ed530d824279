"""The import graph follows the flow of a run (scripts/check_imports.py): no circles, no upward imports."""

from __future__ import annotations

import importlib.util

from support import REPO


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "scripts" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_imports_only_downwards_and_in_no_circle():
    assert _checker().violations(REPO) == []


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path):
    checker = _checker()
    package = tmp_path / "peftcli"
    for folder in ("models", "tuners"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "models" / "a.py").write_text("def f():\n    from peftcli.tuners.b import g\n")  # lazy, still counted
    (package / "tuners" / "b.py").write_text("from peftcli.tuners import c\n")
    (package / "tuners" / "c.py").write_text("from peftcli.tuners.b import g\n")
    assert checker.violations(tmp_path) == [
        "peftcli.models.a imports peftcli.tuners.b, a later layer",
        "import circle: peftcli.tuners.b -> peftcli.tuners.c",
    ]
