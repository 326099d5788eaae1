"""Output files: atomic folders (``atomic_dir``: build in a temp folder next to the target, rename at
the end) and single files (``atomic_file``, ``atomic_write_text``), checksums, and reading back the
JSON manifest such a folder carries (``Manifest.read``: the one manifest reader; a patch's and an
ONNX export's are ``Manifest`` values in ``patch.py`` and ``onnx_vision.py``).

A run that fails or is killed leaves no half-written target. An exception (also Ctrl-C, and SIGTERM,
which the CLI raises as an interrupt) removes the temp folder. A process killed outright (kill -9,
power loss) leaves it behind: temp folders are named ``.tmp-<name>-<host><pid>-<random>`` (host = 6
hex of the host name's sha256) and the next ``atomic_dir`` in the same parent folder removes those of
this host whose process is gone (``sweep_stale``)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from loguru import logger

from ngguard.limits import file_kind, read_text_file, short_repr


def check_out_path(path: str | os.PathLike, *, folder: bool, error: type[Exception] = ValueError) -> Path:
    """Check an output path before any work (nothing is created): if it exists it must be what will
    replace it, a regular file (``folder=False``) or a folder (symlinks followed): a device, a FIFO
    or a socket is never replaced (``--out /dev/full`` run as root would replace the device node); the
    nearest existing parent must be a writable folder (not a file). Raises ``error`` (one line)."""
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp file path next to ``path`` (named as ``temp_prefix``); on success it replaces
    ``path`` (with permissions ``mode``, default a plain ``open``'s), on any exception it is removed. For writers
    that take a path (``safetensors.torch.save_file``, ``PIL.Image.save``, ...)."""
    path = check_out_path(path, folder=False)  # an existing device / FIFO is never replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask if mode is None else mode)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (``atomic_file``), flushed to disk (``mode``: the file's
    permissions, e.g. 0o644; default: a plain ``open``'s). Returns ``path``."""
    with atomic_file(path, mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_file``), flushed to disk. Returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


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


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What the JSON manifest ``name`` of an output folder must hold: its ``format`` (``fmt``), its
    ``format_version`` and the ``required`` keys. ``kind`` names the folder in messages ("patch",
    "ONNX vision"), ``hint`` says how to make one, ``error`` is the exception every problem raises
    (one line naming the file), ``check(manifest, path)``: further checks of the kind's own fields."""

    name: str
    kind: str
    fmt: str
    version: int
    required: tuple[str, ...]
    error: type[Exception] = ValueError
    hint: str = ""
    max_bytes: int | None = None
    check: Callable[[dict, Path], None] | None = None

    def read(self, folder: str | os.PathLike) -> dict:
        """Load ``folder/name`` and check it (see the class)."""
        error, kind, name = self.error, self.kind, self.name
        folder = Path(folder)
        path = folder / name
        if not folder.is_dir():
            raise error(f"{folder}: {kind} folder not found")
        if not path.is_file():
            raise error(f"{folder}: not {_article(kind)} {kind} folder (no {name}{self.hint})")
        try:
            m: Any = json.loads(read_text_file(path, self.max_bytes or 64 << 20, what="manifest"))
        except RecursionError:
            raise error(f"{path}: unreadable manifest (nested too deeply)") from None
        except (OSError, ValueError) as e:
            raise error(f"{path}: unreadable manifest ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(m, dict) or m.get("format") != self.fmt:
            raise error(f"{path}: not an ngguard {kind} manifest")
        if m.get("format_version") != self.version:
            raise error(f"{path}: unsupported {kind} format version {short_repr(m.get('format_version'), 40)} "
                        f"(this ngguard reads {self.version})")
        for key in self.required:
            if key not in m:
                raise error(f"{path}: manifest lacks {key!r}")
        if self.check is not None:
            self.check(m, path)
        return m


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
