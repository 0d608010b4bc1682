"""Wheels for a machine without a package index: what `make wheels` and `make install OFFLINE=1` run.

    python tools/wheelhouse.py download --dest wheels --python 3.12 --platform manylinux_2_28_x86_64 --jax cpu
    python tools/wheelhouse.py project   # cnnexp's own wheel again (its code changed, not its dependencies)
    python tools/wheelhouse.py install --venv .venv --wheels wheels --jax system
    python tools/wheelhouse.py pins      # this Python's own JAX stack, as name==version lines (for --constraint)
    python tools/wheelhouse.py platform  # this machine's platform tag, e.g. manylinux_2_36_x86_64

`download` builds cnnexp's own wheel (configs and sweeps inside), then asks pip for every dependency of
`cnnexp[jax]` (`cnnexp` alone with `--jax system`) as a binary wheel for the target Python and platform:
nothing of the target's is run here. A dependency the index offers only as a source archive is built into a
wheel here (`pip wheel`), and named, when it is pure Python (any target installs it); one with compiled code
can't be built for another machine here, and the error says so.

`install` installs from that folder alone (`--no-index --find-links`). With `--jax system` the virtualenv
sees the Python it was made from (`--system-site-packages`, made by the Makefile) and pins that Python's
JAX stack (jax, jaxlib, their CUDA plugins and NVIDIA libraries, NumPy, SciPy, ml_dtypes: whatever is
installed of what they require) with a constraints file, so that pip never installs another copy of them.

Standard library only: it runs with the target's own Python, before anything else is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILT_NOTE = "BUILT-FROM-SOURCE.txt"  # in the wheel folder: what had no wheel on the index, built here
MAX_BUILDS = 10                       # source-only dependencies built before giving up


class WheelhouseError(Exception):
    """One line for the user, naming what to change."""


def this_platform() -> str:
    """The platform tag of this machine's wheels: manylinux_2_<glibc>_<arch> on glibc Linux, else sysconfig's."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not Linux, or not glibc
        libc = ""
    if libc.startswith("glibc "):
        major, minor = libc.split()[1].split(".")[:2]
        return f"manylinux_{major}_{minor}_{os.uname().machine}"
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def platform_tags(platform: str) -> list[str]:
    """The tags a target accepts: manylinux_2_28_x86_64 takes every older manylinux_2_N too, and their old aliases.

    pip expands manylinux2014/manylinux2010 itself but takes a manylinux_2_N tag literally, so a target
    named manylinux_2_28 would miss the many wheels tagged manylinux_2_17 (manylinux2014) only.
    """
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    newest, arch = int(match.group(1)), match.group(2)
    aliases = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for minor in range(newest, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in aliases:
            tags.append(f"{aliases[minor]}_{arch}")
    return tags


def target_flags(python: str, platform: str) -> list[str]:
    if not re.fullmatch(r"3\.\d+", python):
        raise WheelhouseError(f"WHEELS_PYTHON={python!r} must be a version such as 3.12.")
    version = python.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", f"cp{version}"]
    for tag in platform_tags(platform):
        flags += ["--platform", tag]
    return flags


def pip(*args: str, python: str = sys.executable, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args], capture_output=capture, text=True)


def downloader(python: str) -> str:
    """The interpreter whose pip resolves for the target: one of the target's version where there is one.

    pip takes --python-version for the wheels' tags and Requires-Python, but evaluates environment markers
    (`tomli; python_version < "3.11"`) with the Python it runs in: another version could miss a dependency.
    """
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        return sys.executable
    other = shutil.which(f"python{python}")
    if other:  # a shim (pyenv) may be found and still not run: ask it
        check = subprocess.run([other, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if check.returncode == 0 and check.stdout.strip() == python:
            return other
    print(f"warning: no python{python} here: pip evaluates environment markers with Python "
          f"{sys.version_info.major}.{sys.version_info.minor}; a dependency only Python {python} needs may be missing "
          f"(make wheels PYTHON=python{python} avoids it).", file=sys.stderr)
    return sys.executable


def build_project(dest: Path) -> Path:
    """cnnexp's own wheel, from this checkout."""
    done = pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(PROJECT_ROOT))
    if done.returncode:
        raise WheelhouseError(f"building cnnexp's wheel failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    wheels = sorted(dest.glob("cnnexp-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1]


def build_from_source(requirement: str, dest: Path) -> Path:
    """A dependency the index has no wheel of, built into a pure-Python wheel here."""
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    before = set(dest.glob("*.whl"))
    done = pip("wheel", "--no-deps", "--no-binary", name, "--wheel-dir", str(dest), requirement)
    made = sorted(set(dest.glob("*.whl")) - before)
    if done.returncode or not made:
        raise WheelhouseError(f"{requirement} has no wheel for the target, and building one here failed:\n"
                              f"{done.stderr[-3000:]}")
    wheel = made[0]
    if not wheel.name.endswith("-none-any.whl"):
        wheel.unlink()
        raise WheelhouseError(f"{requirement} has no wheel for the target and compiles code ({wheel.name} here): "
                              f"build it on the target (pip wheel --no-deps '{requirement}') and put it into {dest}.")
    return wheel


def download(dest: Path, python: str, platform: str, jax: str, constraints: Path | None = None) -> list[str]:
    """Every wheel the target needs, into dest; returns the wheels built here from source.

    `constraints`: versions the target keeps, e.g. its JAX stack (`pins` run on the target), so that the wheels
    chosen here fit them; otherwise a conflict shows only at the install on the target.
    """
    dest.mkdir(parents=True, exist_ok=True)
    project = build_project(dest)
    requirement = f"{project}[jax]" if jax == "cpu" else str(project)
    pinned = ["--constraint", str(constraints)] if constraints else []
    resolver = downloader(python)
    built: list[str] = []
    for _ in range(MAX_BUILDS + 1):
        done = pip("download", *target_flags(python, platform), *pinned, "--find-links", str(dest), "--dest", str(dest),
                   requirement, python=resolver)
        if done.returncode == 0:
            summary = [line for line in done.stdout.splitlines() if line.startswith("Successfully downloaded")]
            print(f"{len(summary[0].split()) - 2 if summary else '?'} packages for Python {python} on {platform} "
                  f"(JAX: {jax}) in {dest}/")
            break
        missing = re.search(r"No matching distribution found for (\S+)", done.stderr)
        if not missing:
            raise WheelhouseError(f"pip download failed:\n{done.stderr[-3000:]}")
        wheel = build_from_source(missing.group(1), dest)
        print(f"{missing.group(1)}: no wheel on the index, built from source here: {wheel.name}")
        built.append(wheel.name)
    else:
        raise WheelhouseError(f"more than {MAX_BUILDS} dependencies have no wheel: {built}")
    if built:
        note = dest / BUILT_NOTE
        known = set(note.read_text().split()) if note.exists() else set()
        note.write_text("".join(f"{name}\n" for name in sorted(known | set(built))))
    return built


def jax_stack() -> dict[str, str]:
    """This Python's JAX and everything installed that it requires, recursively: {name: version}."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    installed = {dist.metadata["Name"] for dist in metadata.distributions() if dist.metadata["Name"]}
    todo = [n for n in installed if n.lower() in ("jax", "jaxlib") or re.match(r"jax[-_]", n.lower())]
    stack: dict[str, str] = {}
    while todo:
        name = todo.pop()
        found = version(name)
        if found is None or name.lower() in {n.lower() for n in stack}:
            continue
        stack[name] = found
        for line in metadata.requires(name) or []:
            required = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)
            # An extra's requirement only where it is JAX's own (jax[cuda12]: the plugins and NVIDIA libraries);
            # pinning what an unused extra names (jax[tpu]'s requests) would only stop pip for nothing.
            if not re.search(r"extra\s*==", line) or re.match(r"(jax|nvidia|libtpu)", required.lower()):
                todo.append(required)
    return stack


def install(venv: Path, wheels: Path, jax: str, pip_args: list[str]) -> None:
    python = str(venv / "bin" / "python")
    if not any(wheels.glob("cnnexp-*.whl")):
        raise WheelhouseError(f"no cnnexp wheel in {wheels}/: run `make wheels` where an index is reachable, "
                              f"and copy {wheels}/ here.")
    args = ["install", "--no-index", "--find-links", str(wheels), *pip_args]
    if jax == "system":
        pins = subprocess.run([python, __file__, "pins"], capture_output=True, text=True)
        if pins.returncode or not pins.stdout.strip():
            raise WheelhouseError(f"JAX=system, but {python} sees no jax: make the venv from a Python that has "
                                  "JAX (PYTHON=...), or install JAX from the wheels (JAX=cpu).")
        constraints = venv / "system-jax-constraints.txt"
        constraints.write_text(pins.stdout)
        args += ["--constraint", str(constraints), "cnnexp"]
    else:
        args.append("cnnexp[jax]")
    done = pip(*args, python=python, capture=False)
    if done.returncode:
        hint = (f" With JAX=system this Python's JAX stack is pinned ({venv}/system-jax-constraints.txt): make the "
                "wheels again with WHEELS_CONSTRAINTS=<a copy of that file>, so that they fit it."
                if jax == "system" else "")
        raise WheelhouseError(f"installing from {wheels}/ failed (see above): is it the wheel folder for this "
                              f"Python ({sys.version_info.major}.{sys.version_info.minor}) and platform "
                              f"({this_platform()})?{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/wheelhouse.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="every wheel the target needs, into --dest")
    get.add_argument("--dest", type=Path, default=PROJECT_ROOT / "wheels")
    get.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    get.add_argument("--platform", default=None, help="default: this machine's")
    get.add_argument("--jax", choices=("cpu", "system"), default="cpu")
    get.add_argument("--constraint", type=Path, default=None, help="versions the target keeps (pins' output)")
    own = commands.add_parser("project", help="cnnexp's own wheel again, into --dest")
    own.add_argument("--dest", type=Path, default=PROJECT_ROOT / "wheels")
    put = commands.add_parser("install", help="install cnnexp into --venv from --wheels alone")
    put.add_argument("--venv", type=Path, required=True)
    put.add_argument("--wheels", type=Path, default=PROJECT_ROOT / "wheels")
    put.add_argument("--jax", choices=("cpu", "system"), default="cpu")
    put.add_argument("--pip-args", default="", help="more pip install options, e.g. --pip-args=--no-compile")
    commands.add_parser("pins", help="this Python's JAX stack as name==version lines (nothing: no JAX)")
    commands.add_parser("platform", help="this machine's platform tag")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.dest, args.python, args.platform or this_platform(), args.jax, args.constraint)
        elif args.command == "project":
            print(f"{build_project(args.dest).name} in {args.dest}/")
        elif args.command == "install":
            install(args.venv, args.wheels, args.jax, shlex.split(args.pip_args))
        elif args.command == "pins":
            print("".join(f"{name}=={version}\n" for name, version in sorted(jax_stack().items())), end="")
        else:
            print(this_platform())
    except WheelhouseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
