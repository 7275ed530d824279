"""The lock of the tested stack, constraints/tested.txt: write it from an environment the suite passed in,
and compare an environment against it.

    python scripts/lock.py write FREEZE LOCK      # FREEZE: `pip freeze --all` of the green environment
    python scripts/lock.py compare LOCK FREEZE    # what an environment has that the lock does not

Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from datetime import date
from pathlib import Path

# Never locked: the project itself, and the CUDA packages that only a GPU build of torch pulls in (a GPU
# machine gets those matching its torch build; everything else is pinned the same on CPU and GPU).
UNLOCKED = re.compile(r"^(peftcli|nvidia-.*|triton|cuda-.*)$")
HEADER = """\
# The tested stack: every package that scripts/setup.sh installs, at the versions the whole suite last
# passed with. setup.sh installs with `-c` (and `--build-constraint`) on this file, so `make test` and
# `make quickstart` install the same stack today and in a month. pyproject.toml keeps ranges for people
# who install into their own environment.
#
# Do not edit by hand. Refresh: `make test-latest` (the suite on the newest releases), then `make lock`.
# torch is the CPU wheel on CPU machines (constraints/cpu.txt) and pip's CUDA build of the same version
# on GPU machines.
"""


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (comments, editable and URL lines skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line or line.startswith("-") or " @ " in line:
            continue
        name, version = (part.strip() for part in line.split("==", 1))
        pins[canonical(name)] = version.split("+", 1)[0]  # 2.13.0+cpu is the CPU build of 2.13.0
    return pins


def write(freeze: Path, lock: Path) -> None:
    """Write the lock from a green environment's freeze."""
    pins = {name: version for name, version in read_pins(freeze).items() if not UNLOCKED.match(name)}
    made = (
        f"# Made {date.today().isoformat()} on Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}.\n"
    )
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    lock.write_text(HEADER + made + body, encoding="utf-8")
    print(f"{lock}: {len(pins)} packages locked")


def compare(lock: Path, freeze: Path) -> int:
    """Print how an environment differs from the lock; returns how many packages differ."""
    locked, now = read_pins(lock), read_pins(freeze)
    rows = []
    for name in sorted(set(locked) | set(now)):
        if UNLOCKED.match(name) or locked.get(name) == now.get(name):
            continue
        rows.append((name, locked.get(name, "-"), now.get(name, "-")))
    if not rows:
        print(f"same versions as {lock}")
        return 0
    width = max(len(name) for name, _, _ in rows)
    print(f"{len(rows)} package(s) differ from {lock} (locked -> here):")
    for name, old, new in rows:
        print(f"  {name:<{width}}  {old} -> {new}")
    return len(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    writing = commands.add_parser("write", help="write the lock from a green environment's `pip freeze --all`")
    writing.add_argument("freeze", type=Path)
    writing.add_argument("lock", type=Path)
    comparing = commands.add_parser("compare", help="list the packages whose versions differ from the lock")
    comparing.add_argument("lock", type=Path)
    comparing.add_argument("freeze", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.freeze, args.lock)
    else:
        compare(args.lock, args.freeze)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
