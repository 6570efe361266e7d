"""High-level API: ``save``, ``load`` and ``async_save`` with our writer and reader.

Thin wrappers over ``torch.distributed.checkpoint`` that work with and
without an initialised process group, and that raise our own error types
(the first failing rank's exception, chained to DCP's ``CheckpointException``)
instead of DCP's ``BaseException`` wrapper.

Example:
    >>> import tempfile, torch, dcp_safetensors
    >>> path = tempfile.mkdtemp()
    >>> dcp_safetensors.save({"w": torch.arange(3.0), "step": 7}, path)
    >>> state = {"w": torch.zeros(3), "step": 0}
    >>> dcp_safetensors.load(state, path)
    >>> state["w"].tolist(), state["step"]
    ([0.0, 1.0, 2.0], 7)
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner

from dcp_safetensors.errors import ConfigurationError, RankFailedError
from dcp_safetensors.experts import FusedExperts
from dcp_safetensors.reader import SafetensorsReader
from dcp_safetensors.writer import SafetensorsWriter

if TYPE_CHECKING:
    from dcp_safetensors.planner import MetaResolver

__all__ = ["save", "load", "async_save", "save_submodule"]

T = TypeVar("T")

logger = logging.getLogger("dcp_safetensors")

_async_groups: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _our_errors() -> Iterator[None]:
    """Re-raise DCP's CheckpointException as the lowest failing rank's own exception.

    A rank that only learned of another's failure (``RankFailedError``) gives way to the
    rank that failed: every rank then raises the cause's type (e.g. ``StorageAccessError``).
    """
    try:
        yield
    except CheckpointException as e:
        ranks = sorted(e.failures)
        rank = next((r for r in ranks if not isinstance(e.failures[r][0], RankFailedError)), ranks[0])
        original, _ = e.failures[rank]
        if isinstance(original, Exception):
            raise original from e
        raise


def _agreed(make: Callable[[], T], group: dist.ProcessGroup | None, what: str) -> T:
    """``make()`` on every rank, its outcome agreed before the first collective of ``what``.

    A rank whose options are refused at construction (or whose precondition
    fails) would otherwise leave the others waiting in DCP's first
    collective until the process group's timeout. Every rank raises the
    lowest failing rank's error now, as after a failed save.
    """
    error: Exception | None = None
    made: T | None = None
    try:
        made = make()
    except Exception as e:
        error = e
    if error is not None and _distributed():
        try:
            pickle.dumps(error)
        except Exception:  # an error that cannot travel goes as its text
            error = RankFailedError(f"rank {dist.get_rank(group)} failed before {what}: {type(error).__name__}: {error}")
    error = next((e for e in _from_every_rank(error, group) if e is not None), None)
    if error is not None:
        raise error
    return made  # type: ignore[return-value]


def _from_every_rank(value: T, group: dist.ProcessGroup | None) -> list[T]:
    """``value`` of every rank of ``group``, in rank order (``[value]`` without a process group)."""
    if not _distributed() or dist.get_world_size(group) == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _call(fn: Callable[..., T], **kwargs: Any) -> T:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        with _our_errors():
            return fn(**kwargs, no_dist=not _distributed())


def save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    **writer_options: Any,
) -> None:
    """Save ``state_dict`` (DTensors, tensors, nested dicts, plain values) as HF safetensors at ``path``.

    ``writer_options`` are :class:`SafetensorsWriter`'s (``max_shard_size``,
    ``model_prefix``, ``storage_options``, ``hf_config``, ...). Every rank of
    ``process_group`` must call it. The default planner is a new
    :class:`~dcp_safetensors.planner.SafetensorsSavePlanner`. To skip planning
    when nothing changed since the last save (seconds at hundreds of ranks),
    keep one ``SafetensorsSavePlanner(enable_plan_caching=True)`` per rank and
    pass it to every save: a save whose keys, dtypes, shapes and placements
    are those of the last one reuses its plans (each save still gets its own
    snapshot); anything else is planned again.

    Example:
        >>> import tempfile, torch
        >>> from dcp_safetensors import SafetensorsSavePlanner
        >>> planner = SafetensorsSavePlanner(enable_plan_caching=True)
        >>> for step in range(2):
        ...     save({"layer.weight": torch.full((2, 2), step)}, tempfile.mkdtemp(), planner=planner)
    """
    from dcp_safetensors.planner import SafetensorsSavePlanner

    writer = _agreed(lambda: SafetensorsWriter(path, process_group=process_group, **writer_options), process_group, "saving")
    planner = planner or SafetensorsSavePlanner()
    _call(dcp.save, state_dict=state_dict, storage_writer=writer, planner=planner, process_group=process_group)


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    planner: LoadPlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    **reader_options: Any,
) -> None:
    """Load the checkpoint at ``path`` into ``state_dict`` in place, resharding to its tensors' placements.

    ``reader_options`` are :class:`SafetensorsReader`'s (``model_prefix``,
    ``storage_options``, ``read_threads``). The default planner is a
    :class:`SafetensorsLoadPlanner`: a dtype difference is an error (pass
    ``planner=SafetensorsLoadPlanner(dtype_policy="cast")`` to convert), and a
    tied key the checkpoint lacks is filled through its twin.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp()
        >>> save({"w": torch.ones(2)}, path)
        >>> out = {"w": torch.zeros(2)}
        >>> load(out, path)
        >>> out["w"].tolist()
        [1.0, 1.0]
    """
    from dcp_safetensors.planner import SafetensorsLoadPlanner

    reader = _agreed(lambda: SafetensorsReader(path, process_group=process_group, **reader_options), process_group, "loading")
    planner = planner or SafetensorsLoadPlanner()
    _call(dcp.load, state_dict=state_dict, storage_reader=reader, planner=planner, process_group=process_group)


def save_submodule(
    model: torch.nn.Module,
    name: str,
    path: str | os.PathLike[str],
    *,
    meta_resolver: MetaResolver | None = None,
    dtype: torch.dtype | None = None,
    hf_experts: bool | Sequence[FusedExperts] = False,
    strict: bool = False,
    process_group: dist.ProcessGroup | None = None,
    **writer_options: Any,
) -> None:
    """Save only submodule ``name`` of a (sharded) model, its prefix stripped; no rank gathers anything.

    Every rank writes its own shards of the submodule's tensors, and every rank
    must call it (also ranks holding no bytes of it). With pipeline stages the
    submodule may exist on some ranks only: the others take part with nothing
    to write; on no rank, it is an error on every rank. ``name`` is matched as
    a whole path component: ``"draft"`` never takes ``"draft_head"``'s keys.
    ``meta_resolver``, ``dtype``, ``hf_experts`` and ``strict`` are
    :class:`SafetensorsSavePlanner`'s; the resolver is asked only about the
    submodule's keys, under their full names (``"draft.weight"``), as the
    model's state dict has them.

    Example:
        >>> import tempfile, torch
        >>> from dcp_safetensors import read_checkpoint
        >>> model = torch.nn.ModuleDict({"base": torch.nn.Linear(2, 2), "draft": torch.nn.Linear(2, 1)})
        >>> path = tempfile.mkdtemp()
        >>> save_submodule(model, "draft", path, dtype=torch.bfloat16)
        >>> sorted((k, t.dtype) for k, t in read_checkpoint(path).tensors.items())
        [('bias', 'BF16'), ('weight', 'BF16')]
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from dcp_safetensors.mapping import KeyMapping
    from dcp_safetensors.planner import SafetensorsSavePlanner

    try:
        model.get_submodule(name)
        here = True
    except AttributeError:
        here = False
    # Agreed before any collective: a rank raising alone would leave the others in DCP's.
    holders = [r for r, has in enumerate(_from_every_rank(here, process_group)) if has]
    if not holders:
        raise ConfigurationError(f"model has no submodule {name!r} (on any rank)")
    if not here:
        logger.debug("save_submodule: %r is not on this rank (a pipeline stage); ranks %s hold it", name, holders)
    # The full state dict of a sharded model holds each rank's shards (views), not a gather.
    state = get_model_state_dict(model)
    planner = SafetensorsSavePlanner(
        mapping=KeyMapping(include=[f"{name}.*"], strip_prefix=name),
        dtype=dtype,
        meta_resolver=meta_resolver,
        hf_experts=hf_experts,
        strict=strict,
    )
    save(state, path, planner=planner, process_group=process_group, **writer_options)


def _save_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """A gloo group over the same ranks, made once: a background save must not share the training group."""
    if not _distributed():
        return None
    ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))
    if ranks not in _async_groups:
        group = dist.new_group(list(ranks), backend="gloo")
        if not isinstance(group, dist.ProcessGroup):
            raise RuntimeError(f"this rank is not in the process group {list(ranks)}")
        _async_groups[ranks] = group
    return _async_groups[ranks]


def async_save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    **writer_options: Any,
) -> Any:
    """Stage ``state_dict`` to CPU, then save it in a background thread; returns a future.

    Training may go on (and change the live tensors) as soon as this returns:
    the checkpoint holds the state at the call. The save and its collectives
    run on a dedicated gloo group over the same ranks, never on the training
    group. ``future.result()`` returns once the checkpoint is committed (or
    raises our error). Every rank must call it, and the first call on a group
    creates the save group (a collective). The default planner is
    ``SafetensorsSavePlanner()``; a caching planner passed here must not serve
    two saves in flight at once (it holds one save's state at a time).

    Example:
        >>> import tempfile, torch
        >>> fut = async_save({"w": torch.ones(2)}, tempfile.mkdtemp())
        >>> fut.result() is not None
        True
    """
    from dcp_safetensors.planner import SafetensorsSavePlanner

    group = _save_group(process_group)
    writer = _agreed(lambda: SafetensorsWriter(path, process_group=group, **writer_options), group, "saving")
    # Our planner for its near-linear global step.
    planner = planner or SafetensorsSavePlanner()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        future = dcp.async_save(
            state_dict, storage_writer=writer, planner=planner, process_group=group, no_dist=not _distributed()
        )
    return _UnwrappingFuture(future)


class _UnwrappingFuture:
    """A future whose ``result()`` raises our error types rather than CheckpointException."""

    def __init__(self, future: Any) -> None:
        self._future = future

    def done(self) -> bool:
        return bool(self._future.done())

    def result(self, timeout: float | None = None) -> Any:
        with _our_errors():
            return self._future.result(timeout)
