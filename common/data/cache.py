"""What a data file's bytes are, and reading a file so that what is kept is what its bytes hold."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

_T = TypeVar("_T")


def file_digest(path: Any) -> str | None:
    """SHA-256 of a data file's bytes (None: no such setting or no such file), the path
    resolved as the loaders resolve it (``~`` expanded, relative to the current directory)."""
    if not path:
        return None
    source = Path(str(path)).expanduser().resolve()
    if not source.is_file():
        return None
    stat = source.stat()
    return _digest_of(str(source), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and modification time too: a simulation actor serving many clients
    # hashes a shared file once, and a file edited in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_as_hashed(files: Mapping[str, Any], read: Callable[[], _T], *, attempts: int = 3
                   ) -> tuple[_T, list[str | None]]:
    """``read()`` and the digests (:func:`file_digest`) of the bytes it read of ``files``
    (setting -> path, in order): hashed before the read and again after it, and read again
    if a file changed meanwhile, so what is cached or stored under the digests is what
    those bytes hold, never a file's older or half-written rows."""
    for _ in range(attempts):
        before = [file_digest(f) for f in files.values()]
        value = read()
        after = [file_digest(f) for f in files.values()]
        if after == before:
            return value, before
    changed = next(k for (k, f), a, b in zip(files.items(), after, before) if a != b)
    raise ConfigError(changed, f"{files[changed]} changed while it was read, {attempts} times; "
                      "read it when it is no longer being written")
