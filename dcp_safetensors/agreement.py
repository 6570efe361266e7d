"""Options every rank must agree on, compared where DCP already brings the ranks' plans together.

An option that differs between ranks either changes which collectives a
rank runs (``broadcast_from_rank0`` on some ranks only: they wait in a
broadcast the others never join, until the process group's timeout) or
changes the checkpoint (another key mapping or dtype on one rank). Each
rank declares its options in its local plan; the coordinator compares the
declarations in DCP's global step, before any collective that depends on
them, and raises one error naming the option, the values and the ranks.
DCP hands that error to every rank, and the process group stays usable.
Options that only change one rank's own work (thread counts) may differ.

Pure functions: no torch.distributed.

Example:
    >>> try:
    ...     check_agreement("SafetensorsLoadPlanner", [{"broadcast_from_rank0": True}, {"broadcast_from_rank0": False}])
    ... except ConfigurationError as e:
    ...     print(e)
    SafetensorsLoadPlanner: options differ between ranks (every rank must pass the same): broadcast_from_rank0 is True on rank 0, False on rank 1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from dcp_safetensors.errors import ConfigurationError

__all__ = ["describe", "check_agreement", "check_against_coordinator", "differences"]


def describe(value: Any) -> Any:
    """``value`` as plain data that is equal on two ranks exactly when the option is the same.

    A function becomes its qualified name (its ``repr`` holds an address,
    different in every process); dataclasses, mappings and sequences are
    described item by item.

    Example:
        >>> describe({"rename": str.upper, "dims": (1, 2)})
        {'rename': 'builtins.str.upper', 'dims': [1, 2]}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__qualname__} | {
            f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [describe(v) for v in value]
    if callable(value) and hasattr(value, "__qualname__"):
        owner = getattr(value, "__objclass__", value)  # a method of a builtin type has no module
        return f"{getattr(owner, '__module__', None)}.{value.__qualname__}"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8])) + (" ..." if len(ranks) > 8 else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"


def differences(declared: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per option whose value differs between the ranks' declarations."""
    lines = []
    for name in sorted({k for d in declared for k in d}):
        holders: dict[str, list[int]] = {}
        for rank, options in enumerate(declared):
            holders.setdefault(repr(options.get(name)), []).append(rank)
        if len(holders) > 1:
            lines.append(f"{name} is " + ", ".join(f"{value} on {_ranks(r)}" for value, r in holders.items()))
    return lines


def check_agreement(role: str, declared: Sequence[Mapping[str, Any] | None]) -> None:
    """Raise :class:`ConfigurationError` if ``role``'s options differ between ranks.

    ``declared[rank]`` is that rank's options (:func:`describe`), or None
    where the rank does not use ``role`` at all (another planner or reader).
    """
    missing = [r for r, d in enumerate(declared) if d is None]
    if len(missing) == len(declared):
        return
    if missing:
        using = [r for r, d in enumerate(declared) if d is not None]
        raise ConfigurationError(f"{role} is used on {_ranks(using)} but not on {_ranks(missing)}; every rank must use the same")
    lines = differences([d for d in declared if d is not None])
    if lines:
        raise ConfigurationError(f"{role}: options differ between ranks (every rank must pass the same): {'; '.join(lines)}")


def check_against_coordinator(role: str, rank: int, mine: Mapping[str, Any], coordinator: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` if this ``rank``'s options differ from the coordinator's.

    For options the coordinator sends back with every plan (so a reused,
    cached plan is checked too).

    Example:
        >>> try:
        ...     check_against_coordinator("SafetensorsWriter", 1, {"max_shard_size": 10}, {"max_shard_size": 20})
        ... except ConfigurationError as e:
        ...     print(e)
        SafetensorsWriter: options differ between ranks (every rank must pass the same): max_shard_size is 10 on rank 1, 20 on the coordinator
    """
    lines = [
        f"{name} is {mine.get(name)!r} on rank {rank}, {coordinator.get(name)!r} on the coordinator"
        for name in sorted(set(mine) | set(coordinator))
        if mine.get(name) != coordinator.get(name)
    ]
    if lines:
        raise ConfigurationError(f"{role}: options differ between ranks (every rank must pass the same): {'; '.join(lines)}")
