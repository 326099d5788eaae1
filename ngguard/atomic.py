"""Output files: atomic folders (build in a temp folder next to the target, rename at the end) and checksums.

A run that fails or is killed leaves no half-written target (at most a ``.tmp-*`` folder when the
process is killed outright; an exception removes it)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
               error: type[Exception] = ValueError) -> Iterator[Path]:
    """Yield a fresh temp folder next to ``out_dir``; on success it replaces ``out_dir`` (an existing
    one only with ``overwrite``), on any exception it is removed. Problems raise ``error``."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise error(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
        if not out_dir.is_dir():
            raise error(f"{out_dir} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-old-", dir=out_dir.parent))
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


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed (checkpoints can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
