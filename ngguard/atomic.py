"""Output files: atomic folders (build in a temp folder next to the target, rename at the end), checksums,
and reading back the JSON manifest such a folder carries (``read_manifest``).

A run that fails or is killed leaves no half-written target. An exception (also Ctrl-C, and SIGTERM,
which the CLI raises as an interrupt) removes the temp folder. A process killed outright (kill -9,
power loss) leaves it behind: temp folders are named ``.tmp-<name>-<host><pid>-<random>`` (host = 6
hex of the host name's sha256) and the next ``atomic_dir`` in the same parent folder removes those of
this host whose process is gone (``sweep_stale``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from loguru import logger


def check_out_path(path: str | os.PathLike, *, folder: bool, error: type[Exception] = ValueError) -> Path:
    """Check an output path before any work (nothing is created): if it exists it must be what will
    replace it, a regular file (``folder=False``) or a folder (symlinks followed): a device, a FIFO
    or a socket is never replaced (``--out /dev/full`` run as root would replace the device node); the
    nearest existing parent must be a writable folder (not a file). Raises ``error`` (one line)."""
    from ngguard.limits import file_kind

    path = Path(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # missing, or under a file (refused below)
        st = None
    except OSError as e:  # ELOOP, EACCES, ...
        raise error(f"{path}: cannot use it as output ({e.strerror or e})") from None
    if st is not None:
        want = stat.S_ISDIR if folder else stat.S_ISREG
        if not want(st.st_mode):
            raise error(f"{path}: exists and is {file_kind(st.st_mode)}, not {'a folder' if folder else 'a regular file'}: "
                        f"refusing to replace it")
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{path}: cannot create it: {parent} is {_kind_of(parent)}, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{path}: cannot write here ({parent} is not a writable folder)")
    return path


def _kind_of(path: Path) -> str:
    from ngguard.limits import file_kind

    try:
        return file_kind(os.stat(path).st_mode)
    except OSError:
        return "a dangling link" if os.path.islink(path) else "not a folder"


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
               error: type[Exception] = ValueError) -> Iterator[Path]:
    """Yield a fresh temp folder next to ``out_dir``; on success it replaces ``out_dir`` (an existing
    one only with ``overwrite``), on any exception it is removed. Problems raise ``error``."""
    out_dir = Path(out_dir).absolute()
    check_out_path(out_dir, folder=True, error=error)  # not a device / FIFO / file; its parent is a folder
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise error(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
        if not out_dir.is_dir():
            raise error(f"{out_dir} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir.name), dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        _default_modes(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(f"{out_dir.name}-old"), dir=out_dir.parent))
            os.replace(out_dir, old)  # onto an empty folder: allowed
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_modes(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would (0666 / 0777 for executables, minus the umask):
    some writers (safetensors' ``save_file``) create files 0600, which a server running as another
    user (the Docker image's uid 10001) cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, (0o777 if f.stat().st_mode & 0o100 else 0o666) & ~mask)


_STALE = re.compile(r"\.tmp-.*-([0-9a-f]{6})p(\d+)-[A-Za-z0-9_]+")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def temp_prefix(name: str) -> str:
    """Prefix of a temp folder for ``name``: ``.tmp-<name>-<host><pid>-`` (see ``sweep_stale``)."""
    return f".tmp-{name}-{_host_tag()}p{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp folders in ``folder`` left by killed processes of this host (name pattern of
    ``temp_prefix``, process id no longer running). Others' folders, live ones, and anything not
    matching the pattern are left alone. Returns the removed paths."""
    removed = []
    host = _host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.fullmatch(entry.name)
        if not m or m.group(1) != host or _alive(int(m.group(2))):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.exists(entry.path):
            logger.info("removed {} (left by process {}, which is gone)", entry.path, m.group(2))
            removed.append(Path(entry.path))
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed (checkpoints can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike, name: str, *, error: type[Exception], kind: str, fmt: str, version: int,
                  required: Iterable[str], hint: str = "", max_bytes: int | None = None) -> dict:
    """The JSON manifest ``folder/name`` of an output folder, checked for its ``format`` (``fmt``), its
    ``format_version`` and the ``required`` keys; every problem raises ``error`` as one line naming
    the file. ``kind`` names the folder ("patch", "ONNX vision"); ``hint``: how to make one."""
    from ngguard.limits import read_text_file, short_repr

    folder = Path(folder)
    path = folder / name
    if not folder.is_dir():
        raise error(f"{folder}: {kind} folder not found")
    if not path.is_file():
        raise error(f"{folder}: not {_article(kind)} {kind} folder (no {name}{hint})")
    try:
        m: Any = json.loads(read_text_file(path, max_bytes or 64 << 20, what="manifest"))
    except RecursionError:
        raise error(f"{path}: unreadable manifest (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise error(f"{path}: unreadable manifest ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise error(f"{path}: not an ngguard {kind} manifest")
    if m.get("format_version") != version:
        raise error(f"{path}: unsupported {kind} format version {short_repr(m.get('format_version'), 40)} "
                    f"(this ngguard reads {version})")
    for key in required:
        if key not in m:
            raise error(f"{path}: manifest lacks {key!r}")
    return m


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
