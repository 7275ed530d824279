"""The lock of the tested stack (constraints/tested.txt) against pyproject.toml, and the lock tool itself."""

from __future__ import annotations

import subprocess
import sys

import tomllib
from packaging.requirements import Requirement

from support import REPO

LOCK = REPO / "constraints" / "tested.txt"
sys.path.insert(0, str(REPO / "scripts"))
import lock  # noqa: E402  (scripts/lock.py: standard library only, not part of the package)


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [item for group in project["optional-dependencies"].values() for item in group]
    every = [Requirement(item) for item in project["dependencies"] + extras]
    return [r for r in every if r.name != project["name"]]  # an extra that names others (peftcli[mlflow])


def test_every_dependency_is_locked_inside_its_range():
    pins = lock.read_pins(LOCK)
    for requirement in requirements():
        name = lock.canonical(requirement.name)
        assert name in pins, f"{name} is a dependency but {LOCK.name} does not pin it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], requirement)


def test_the_lock_pins_the_tools_that_install_and_build():
    pins = lock.read_pins(LOCK)
    assert {"pip", "setuptools"} <= set(pins)  # setup.sh passes the lock as --build-constraint too
    build = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    for item in build:
        requirement = Requirement(item)
        assert requirement.specifier.contains(pins[lock.canonical(requirement.name)])


def test_write_keeps_pins_and_drops_the_project_and_cuda_packages(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "Jinja2==3.1.6\ntorch==2.13.0+cpu\nnvidia-cublas-cu12==12.8.4.1\ntriton==3.5.0\n"
        "# Editable Git install with no remote (peftcli==0.1.0)\n-e /src/peftcli\npip==26.3\n"
        "typing_extensions==4.16.0\nsomething @ file:///tmp/x.whl\n",
        encoding="utf-8",
    )
    out = tmp_path / "tested.txt"
    lock.write(freeze, out)
    assert lock.read_pins(out) == {"jinja2": "3.1.6", "torch": "2.13.0", "pip": "26.3", "typing-extensions": "4.16.0"}
    text = out.read_text(encoding="utf-8")
    assert "make lock" in text and "# Made " in text


def test_compare_names_each_package_that_moved(tmp_path):
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("transformers==5.23.0\npeft==0.21.2\nrich==15.0.0\n", encoding="utf-8")
    new.write_text("transformers==5.24.0\npeft==0.21.2\nhttpx==1.0\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "lock.py"), "compare", str(old), str(new)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("3 package(s) differ")
    assert [line.split() for line in lines[1:]] == [
        ["httpx", "-", "->", "1.0"],
        ["rich", "15.0.0", "->", "-"],
        ["transformers", "5.23.0", "->", "5.24.0"],
    ]
