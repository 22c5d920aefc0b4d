"""Writing directories so that a reader never sees a half-written one: build in a temp dir, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ckaqad.errors import ConfigError


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Fail early (before any work) if `path` cannot be created or written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a directory")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not writable")
    return path


def ordinary_permissions(root: Path) -> None:
    """Give `root` and everything in it the modes a plain `open()` / `mkdir` would (0666 / 0777 less the
    umask). mkdtemp makes directories private and safetensors writes its files 0600; an export must stay
    readable by the serving engine's user."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target` (kept files of an existing
    `target` that the new one lacks are dropped). On error the temp dir is removed and `target` untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        ordinary_permissions(tmp)
        if target.exists():
            if not replace:
                raise ConfigError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
