"""Image trees read as bytes, in memory: a directory, or a .tar(.gz/.bz2/.xz) / .zip of one.

Promises: `open_tree(path)` lists files by their relative posix path and reads them as bytes;
nothing is ever extracted or written to disk. Refuses (DataError naming the archive and the
member, before anything is read): members with an absolute path or '..' parts, links, and
devices or pipes, which an image archive never needs. A damaged archive is one DataError too.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from cnnexp.errors import DataError

MAX_MEMBER_BYTES = 1 << 30  # a member this large is not an image: skipped unread (zip bombs included)


class Tree:
    """The files of an image tree by relative posix path; archives are listed (and vetted) on first use."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def where(self, relative: str) -> str:
        return f"{self.path}:{relative}" if relative else str(self.path)

    def files(self) -> list[str]:
        raise NotImplementedError

    def folders(self) -> list[str]:
        return []

    def read(self, names: list[str]) -> Iterator[tuple[str, bytes | str]]:
        """(name, bytes) for each of `names` in storage order; a string instead of bytes says why not."""
        raise NotImplementedError


class _Directory(Tree):
    def where(self, relative: str) -> str:
        return str(self.path / relative)

    def files(self) -> list[str]:
        return [self._relative(d, f) for d, _, fs in os.walk(self.path) for f in fs]

    def folders(self) -> list[str]:
        return [self._relative(d, f) for d, ds, _ in os.walk(self.path) for f in ds]

    def _relative(self, folder: str, name: str) -> str:
        relative = os.path.relpath(folder, self.path).replace(os.sep, "/")
        return name if relative == "." else f"{relative}/{name}"

    def read(self, names):
        for name in names:
            path = self.path / name
            try:
                info = path.lstat()  # the entry itself: a link to /dev/zero is not an image
                if not stat.S_ISREG(info.st_mode):
                    yield name, "not a regular file (a link, device or pipe)"
                elif info.st_size > MAX_MEMBER_BYTES:
                    yield name, f"{info.st_size:,} bytes: too large for an image"
                else:
                    yield name, path.read_bytes()
            except OSError as err:
                yield name, f"cannot read: {err.strerror or err}"


class _Zip(Tree):
    def __init__(self, path: Path):
        super().__init__(path)
        self.archive = zipfile.ZipFile(path)

    def close(self):
        self.archive.close()

    @cached_property
    def members(self) -> dict[str, zipfile.ZipInfo]:
        """Every member, checked: the whole archive is vetted before any image is decoded."""
        members = {}
        for info in self.archive.infolist():
            kind = (info.external_attr >> 16) & 0o170000
            _check_member(self.path, info.filename, kind == 0o120000, kind not in (0, 0o100000, 0o040000, 0o120000))
            members[_key(info.filename)] = info
        members.pop("", None)
        return members

    def files(self):
        return [name for name, info in self.members.items() if not info.is_dir()]

    def folders(self):
        return [name for name, info in self.members.items() if info.is_dir()]

    def read(self, names):
        for name in sorted(names, key=lambda n: self.members[n].header_offset):
            if self.members[name].file_size > MAX_MEMBER_BYTES:
                yield name, f"{self.members[name].file_size} bytes, more than an image should be"
                continue
            try:
                yield name, self.archive.read(self.members[name])
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as err:
                yield name, f"cannot read from the zip: {err}"


class _Tar(Tree):
    def __init__(self, path: Path):
        super().__init__(path)
        self.archive = tarfile.open(path)

    def close(self):
        self.archive.close()

    @cached_property
    def members(self) -> dict[str, tarfile.TarInfo]:
        """Every member, checked: the whole archive is vetted before any image is decoded."""
        members = {}
        try:
            for member in self.archive:
                _check_member(self.path, member.name, member.issym() or member.islnk(),
                              not (member.isfile() or member.isdir() or member.issym() or member.islnk()))
                members[_key(member.name)] = member
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"dataset.path={str(self.path)!r} is a damaged archive ({err}); stage it again.") from err
        members.pop("", None)
        return members

    def files(self):
        return [name for name, member in self.members.items() if member.isfile()]

    def folders(self):
        return [name for name, member in self.members.items() if member.isdir()]

    def read(self, names):
        for name in sorted(names, key=lambda n: self.members[n].offset_data):  # one forward pass
            if self.members[name].size > MAX_MEMBER_BYTES:
                yield name, f"{self.members[name].size} bytes, more than an image should be"
                continue
            try:
                yield name, self.archive.extractfile(self.members[name]).read()
            except (tarfile.TarError, OSError, EOFError) as err:
                yield name, f"cannot read from the tar: {err}"


def _key(name: str) -> str:
    """A member's path as the listing spells it ('./a//b' -> 'a/b')."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def open_tree(path: Path) -> Tree:
    if path.is_dir():
        return _Directory(path)
    if zipfile.is_zipfile(path):
        try:
            return _Zip(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"dataset.path={str(path)!r} is a damaged zip ({err}); stage it again.") from err
    if tarfile.is_tarfile(path):
        try:
            return _Tar(path)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"dataset.path={str(path)!r} is a damaged archive ({err}); stage it again.") from err
    raise DataError(f"dataset.path={str(path)!r} is neither a folder, a tar nor a zip archive.")


def _check_member(archive: Path, name: str, is_link: bool, is_special: bool) -> None:
    """Refuse what an image archive never needs; nothing is extracted, but a member is suspect."""
    parts = name.replace("\\", "/").split("/")  # plain string work: pathlib costs seconds on 60,000 members
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(f"Refusing to read {archive.name}: member {name!r} has an absolute path or '..' parts, "
                        "which an image archive never needs; rebuild the archive with relative paths.")
    if is_link:
        raise DataError(f"Refusing to read {archive.name}: member {name!r} is a link; "
                        "an image archive should hold only folders and image files.")
    if is_special:
        raise DataError(f"Refusing to read {archive.name}: member {name!r} is a device or pipe; "
                        "an image archive should hold only folders and image files.")
