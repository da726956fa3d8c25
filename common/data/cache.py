"""What one process keeps of the data it read: one small cache, bounded, that follows the
bytes of the data files.

One process serves many rounds and, in simulation, many clients: :data:`DATA_CACHE` keeps
the last few things read (a data configuration's partitions, a client's tokenised
partition), each with the digests of the file bytes it was read from, so a file edited,
grown or cut since is read again. It holds :data:`DATA_CACHE_SIZE` entries at most, the
least recently used dropped first: an actor serving 1,000 clients keeps a few tokenised
partitions, not 1,000. Values are read under :func:`read_as_hashed`, so what is kept is
what those bytes hold.
"""

from __future__ import annotations

import functools
import hashlib
import json
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
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


def read_as_hashed(
    files: Mapping[str, Any], read: Callable[[], _T], *, attempts: int = 3
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
    raise ConfigError(
        changed,
        f"{files[changed]} changed while it was read, {attempts} times; read it when it is no longer being written",
    )


def key_of(*parts: Any) -> str:
    """SHA-256 of ``parts`` as sorted-key JSON (other values by ``str``): the key of what a
    cached value depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class BoundedCache:
    """At most ``maxsize`` values, the least recently used dropped first, each kept with the
    digests (:func:`file_digest`) of the files it was read from and served only while the
    files' digests are still those."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._entries: OrderedDict[str, tuple[list[str | None], Any]] = OrderedDict()
        # A value's parts (a tokenised dataset, ...) -> the digests it was read from; weak, so it
        # follows the objects still in use, evicted or not.
        self._read_from: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, parts: Sequence, read: Callable[[], _T], files: Mapping[str, Any] | None = None) -> _T:
        """The value kept under ``parts`` (:func:`key_of`) if ``files`` (setting -> path) still
        hold the bytes it was read from; else ``read()`` under :func:`read_as_hashed`, kept."""
        files = files or {}
        key = key_of(*parts)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == [file_digest(f) for f in files.values()]:
            self._entries.move_to_end(key)
            return entry[1]
        value, digests = read_as_hashed(files, read)
        self._entries[key] = (digests, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        for item in value if isinstance(value, tuple) else (value,):
            try:
                self._read_from[item] = digests
            except TypeError:  # not weakly referenceable (a list of names): nothing to look up
                pass
        return value

    def read_from(self, item: Any) -> list[str | None] | None:
        """The digests of the bytes ``item`` (a value :meth:`get` returned, or a part of a tuple
        value) was read from; None for anything else."""
        try:
            return self._read_from.get(item)
        except TypeError:
            return None

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._read_from.clear()


#: How many values :data:`DATA_CACHE` keeps: a data configuration's partitions stay (each
#: new client's read uses them, so they are never the least recently used) next to the last
#: few clients' tokenised partitions.
DATA_CACHE_SIZE = 8
#: The one cache of data a process keeps (see the module docstring).
DATA_CACHE = BoundedCache(DATA_CACHE_SIZE)
