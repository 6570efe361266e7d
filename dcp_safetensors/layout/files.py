"""Which file each tensor goes to, where it sits inside, and the file's header: the HF rules.

Owns what ``save_pretrained`` would decide for the same tensors:
:func:`parse_size` reads ``max_shard_size`` as transformers does,
tensors fill files in :func:`natural_key` order up to that size
(:func:`assign_files`), files get HF names (:func:`file_names`), and inside a
file tensors sit in ``save_file``'s order, dtype then name, behind a header
encoded by :mod:`dcp_safetensors.format` (:func:`build_file`).
:class:`FileLayout` is one such file. Nothing here knows about ranks.

Example:
    >>> [f.name for f in plan_files([TensorSpec("a", "a", "F32", (4,)), TensorSpec("b", "b", "F32", (4,))], 16, {})]
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.format import TensorEntry, dtype_sort_key, encode_header
from dcp_safetensors.layout.geometry import TensorSpec

__all__ = [
    "FileLayout",
    "parse_size",
    "natural_key",
    "file_names",
    "assign_files",
    "build_file",
    "plan_files",
    "split_limit",
    "MIN_SPLIT_FILE",
]

MIN_SPLIT_FILE = 16 << 20
"""The smallest file :func:`split_limit` cuts a group into, to spread writes over files."""


@dataclass(frozen=True)
class FileLayout:
    """One output file: its relative name, header bytes, tensor entries (file order), size."""

    name: str
    group: str
    header: bytes
    entries: tuple[TensorEntry, ...]

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def size(self) -> int:
        return self.data_start + self.data_size


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes in ``size`` as transformers reads ``max_shard_size``.

    An int is bytes; ``"5GB"`` is ``5 * 10**9``; ``"5GiB"`` is ``5 * 2**30``;
    a lower-case ``b`` after a decimal unit means bits, as in transformers
    (``"8Mb"`` is 10**6 bytes).

    Example:
        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(1000)
        (5000000000, 2097152, 1000)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConfigurationError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(size)
        if not m:
            raise ConfigurationError(
                f"max_shard_size {size!r} is not a size: use an int (bytes) or e.g. '5GB', '500MB', '2GiB'"
            )
        number, unit = m.groups()
        factor = _SIZE_UNITS.get(unit.upper())
        if factor is None:  # the pattern also lets through e.g. "5K", "5i", "5GI"
            raise ConfigurationError(
                f"max_shard_size {size!r} has an unknown unit {unit!r}: use e.g. '5GB', '500MB', '2GiB'"
            )
        value = int(Fraction(number) * factor)  # exact: "1.005KB" is 1005, not 1004
        if unit.endswith("b") and "i" not in unit.lower() and unit.upper() != "B":
            value //= 8
    if value <= 0:
        raise ConfigurationError(f"max_shard_size must be positive, got {size!r}")
    return value


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``layers.2`` before ``layers.10``.

    Example:
        >>> sorted(["l.10.w", "l.2.w"], key=natural_key)
        ['l.2.w', 'l.10.w']
    """
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def file_names(stem: str, count: int) -> list[str]:
    """HF file names for ``count`` files of ``stem``.

    Example:
        >>> file_names("model", 1), file_names("model", 2)
        (['model.safetensors'], ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def assign_files(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """One group's tensors in :func:`natural_key` order, cut into files of at most ``max_bytes``.

    A tensor larger than ``max_bytes`` gets a file of its own, as in transformers.
    """
    files: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    used = 0
    for spec in sorted(specs, key=lambda s: natural_key(s.name)):
        if current and used + spec.nbytes > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(spec)
        used += spec.nbytes
    if current:
        files.append(current)
    return files


def build_file(name: str, group: str, specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> FileLayout:
    """The file holding ``specs`` in ``save_file``'s order (dtype, then name), with its header."""
    entries = []
    position = 0
    for spec in sorted(specs, key=lambda s: dtype_sort_key(s.dtype, s.name)):
        entries.append(TensorEntry(spec.name, spec.dtype, spec.shape, position, position + spec.nbytes))
        position += spec.nbytes
    return FileLayout(name, group, encode_header(entries, metadata), tuple(entries))


def split_limit(total: int, max_bytes: int, min_files: int) -> int:
    """The file size limit that cuts ``total`` bytes into at least ``min_files`` files of at most ``max_bytes``.

    Files stay at least :data:`MIN_SPLIT_FILE` bytes: a file's fixed costs
    (its header, open, ``fsync`` and rename) outweigh writing a smaller one
    alongside the others.

    Example:
        >>> split_limit(1 << 30, 5 * 10**9, 4) == 1 << 28, split_limit(1 << 20, 5 * 10**9, 4) == MIN_SPLIT_FILE
        (True, True)
    """
    return min(max_bytes, max(-(-total // max(min_files, 1)), MIN_SPLIT_FILE))


def plan_files(
    tensors: Sequence[TensorSpec], max_bytes: int, metadata: Mapping[str, str], min_files: int = 1
) -> list[FileLayout]:
    """Every file of the checkpoint: groups in name order, each cut by :func:`assign_files`.

    ``min_files`` > 1 cuts each group into at least that many files (as its
    tensors and :func:`split_limit` allow), so that ranks can write different
    files at once.
    """
    groups: dict[str, list[TensorSpec]] = defaultdict(list)
    for spec in tensors:
        groups[spec.group].append(spec)
    files: list[FileLayout] = []
    for group in sorted(groups):
        limit = max_bytes if min_files <= 1 else split_limit(sum(s.nbytes for s in groups[group]), max_bytes, min_files)
        assigned = assign_files(groups[group], limit)
        for fname, members in zip(file_names(group, len(assigned)), assigned, strict=False):
            files.append(build_file(fname, group, members, metadata))
    return files
