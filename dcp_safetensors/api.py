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
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner

from dcp_safetensors.errors import CheckpointChangedError, ConfigurationError, RankFailedError
from dcp_safetensors.experts import FusedExperts
from dcp_safetensors.reader import SafetensorsReader
from dcp_safetensors.writer import SafetensorsWriter

if TYPE_CHECKING:
    from dcp_safetensors.planner import MetaResolver

__all__ = ["save", "load", "async_save", "AsyncSaver", "save_submodule"]

T = TypeVar("T")

LOAD_ATTEMPTS = 3
"""Loads of one ``load()`` call when saves keep replacing the checkpoint under it."""

logger = logging.getLogger("dcp_safetensors")

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
    ``storage_options``, ``read_threads``, ``verify_checksums``: every byte
    read is checked against the save's block checksums unless it is False).
    The default planner is a
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
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            _call(dcp.load, state_dict=state_dict, storage_reader=reader, planner=planner, process_group=process_group)
            return
        except CheckpointChangedError as e:
            # Raised on every rank together (DCP gathers read_data's outcome): all load again.
            if attempt == LOAD_ATTEMPTS:
                raise
            logger.info("%s: a save replaced the checkpoint during the load (%s); loading again", path, e)


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


class AsyncSaver:
    """Background saves that run one at a time, in call order, on a gloo group of their own.

    ``save()`` copies the state to CPU memory and returns a future at once;
    training may then change the live tensors. Saves run in a background
    thread strictly one after another, so two saves never mix their
    collectives (DCP's own ``async_save`` starts each save at once, and
    overlapping ones hang). Each save gets the state at its call, also when
    it waits behind another, to the same directory or a new one.

    Args:
        process_group: the ranks that save (default: every rank). Each of
            them calls :meth:`save` for the same checkpoints in the same order.
        max_pending: staged saves that may wait behind the running one; each
            holds a CPU copy of the state. A save beyond it waits in
            :meth:`save` for the oldest to finish. Waiting saves mean saves
            take longer than the interval between them: each is logged as a
            WARNING.

    The gloo group is made by the first :meth:`save` (a collective over the
    default group); :meth:`close` waits for every save and frees it.

    Example:
        >>> import tempfile, torch
        >>> saver = AsyncSaver()
        >>> futures = [saver.save({"w": torch.full((2,), float(step))}, tempfile.mkdtemp()) for step in range(3)]
        >>> [f.result() is not None for f in futures]
        [True, True, True]
        >>> saver.close()
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, max_pending: int = 1) -> None:
        if max_pending < 0:
            raise ConfigurationError(f"max_pending must be >= 0, got {max_pending}")
        self.process_group = process_group
        self.max_pending = max_pending
        self._group: dist.ProcessGroup | None = None
        self._world: dist.ProcessGroup | None = None  # the default group the save group was made in
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dcp-safetensors-async-save")
        self._pending: deque[tuple[Future[Any], str, float]] = deque()

    def save(
        self,
        state_dict: dict[str, Any],
        path: str | os.PathLike[str],
        *,
        planner: SavePlanner | None = None,
        **writer_options: Any,
    ) -> Future[Any]:
        """Stage ``state_dict`` to CPU and queue its save to ``path``; returns the save's future.

        ``future.result()`` returns once the checkpoint is committed, or raises
        our error (the same on every rank). ``writer_options`` and ``planner``
        are :func:`save`'s; a caching planner may serve every save of one
        saver, as they never overlap.
        """
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.stateful import Stateful

        from dcp_safetensors.planner import SafetensorsSavePlanner

        group = self._save_group()
        # Agreed on the caller's group: the save group may be busy with a running save.
        writer = _agreed(lambda: SafetensorsWriter(path, process_group=group, **writer_options), self.process_group, "saving")
        self._make_room(os.fspath(path))
        # A copy now: the checkpoint holds the state at this call, whenever the save runs.
        state = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}
        stager = DefaultStager(StagingOptions(False, False, False, False))
        try:
            staged = stager.stage(state)
        finally:
            stager.close()
        future = self._executor.submit(
            _call, dcp.save, state_dict=staged, storage_writer=writer, planner=planner or SafetensorsSavePlanner(),
            process_group=group,
        )
        self._pending.append((future, os.fspath(path), time.monotonic()))
        return future

    def _make_room(self, path: str) -> None:
        while self._pending and self._pending[0][0].done():
            self._pending.popleft()
        if not self._pending:
            return
        _, oldest, started = self._pending[0]
        logger.warning(
            "async save to %s waits behind %d earlier save(s) (the oldest, to %s, started %.1f s ago): saves take "
            "longer than the interval between them", path, len(self._pending), oldest, time.monotonic() - started,
        )
        while len(self._pending) > self.max_pending:
            wait([self._pending[0][0]])
            self._pending.popleft()

    def _save_group(self) -> dist.ProcessGroup | None:
        if not _distributed():
            return None
        world = dist.group.WORLD
        if self._group is None or self._world is not world:
            # Made (a collective) on the first save, and again after the default group was re-created.
            ranks = dist.get_process_group_ranks(self.process_group or world)
            group = dist.new_group(ranks, backend="gloo")
            if not isinstance(group, dist.ProcessGroup):
                raise ConfigurationError(f"this rank is not in the process group {ranks}")
            self._group, self._world = group, world
        return self._group

    def wait(self) -> None:
        """Wait until every queued save has finished (their errors stay in their futures)."""
        wait([f for f, _, _ in self._pending])
        self._pending.clear()

    def close(self) -> None:
        """Wait for every save, then free the thread and the save group."""
        self.wait()
        self._executor.shutdown()
        if self._group is not None and _distributed() and self._world is dist.group.WORLD:
            dist.destroy_process_group(self._group)
        self._group = None

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def async_save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    saver: AsyncSaver | None = None,
    **writer_options: Any,
) -> Future[Any]:
    """Stage ``state_dict`` to CPU, then save it in the background; returns a future.

    The saves of one :class:`AsyncSaver` run one at a time, in call order, on
    a gloo group of their own, never on the training group: training may go on
    (and change the live tensors) as soon as this returns, and the checkpoint
    holds the state at the call, also when saves overlap. Without ``saver``,
    the saves of one process group share one saver, made by the first call
    (a collective); pass your own to choose ``max_pending`` or to free it with
    :meth:`AsyncSaver.close`. Every rank must call it.

    Example:
        >>> import tempfile, torch
        >>> fut = async_save({"w": torch.ones(2)}, tempfile.mkdtemp())
        >>> fut.result() is not None
        True
    """
    if saver is None:
        key = (id(dist.group.WORLD) if _distributed() else 0, id(process_group))
        saver = _DEFAULT_SAVERS.get(key)
        if saver is None or saver.process_group is not process_group:
            saver = _DEFAULT_SAVERS[key] = AsyncSaver(process_group)
    return saver.save(state_dict, path, planner=planner, **writer_options)


_DEFAULT_SAVERS: dict[tuple[int, int], AsyncSaver] = {}
"""``async_save``'s savers, by (default group, process group): the one piece of state this
module keeps, as saves of one group must queue behind each other."""
