"""``SafetensorsWriter``: a DCP ``StorageWriter`` that writes HF safetensors in one pass.

DCP calls the methods in this order (``dcp.save``)::

    all ranks    reset(checkpoint_id)            a new save begins
    all ranks    set_up_storage_writer(is_coordinator, rank=, use_collectives=)
    all ranks    prepare_local_plan(plan)        -> the planner's items, unchanged
    coordinator  prepare_global_plan(plans)      plans the whole byte layout once:
                                                 files, headers, where each rank's
                                                 tensors lie, parts and transfers
                                                 (object stores: min_part/max_part);
                                                 a fresh snapshot id;
                                                 storage.begin_save (staging dir on
                                                 POSIX, multipart uploads on S3)
    all ranks    write_data(plan, planner)       resolve own chunks; on POSIX write
                                                 them in place (pwrite per run, a
                                                 CRC-32 share per file), fsync; on
                                                 object stores rounds of all_to_all
                                                 for bytes of other ranks' parts,
                                                 then own parts (UploadPart)
    coordinator  finish(metadata, results)       checks the parts tile every file,
                                                 writes the index, commits

No rank gathers a full tensor, nothing is written twice, and no byte is read
back. Errors on any rank reach every rank through DCP (``CheckpointException``),
and the previous checkpoint in the directory stays intact until the commit.

Example:
    >>> import tempfile, torch, torch.distributed.checkpoint as dcp
    >>> from dcp_safetensors import SafetensorsWriter, SafetensorsReader
    >>> path = tempfile.mkdtemp()
    >>> _ = dcp.save({"w": torch.arange(4.0)}, storage_writer=SafetensorsWriter(path))
    >>> out = {"w": torch.zeros(4)}
    >>> dcp.load(out, storage_reader=SafetensorsReader(path))
    >>> out["w"].tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_safetensors.agreement import check_against_coordinator
from dcp_safetensors.blocks import BlockReport
from dcp_safetensors.collectives import (
    ByteSource,
    agree_on_errors,
    collective_device,
    exchange_rows,
    transfer,
)
from dcp_safetensors.dtypes import to_safetensors_dtype
from dcp_safetensors.errors import ConfigurationError, LayoutError
from dcp_safetensors.global_plan import PlannedSave, collect_chunks, declared_specs
from dcp_safetensors.hf_config import config_files, with_weights_dtype
from dcp_safetensors.layout import (
    SMALL_RUN,
    CheckpointLayout,
    ChunkArrays,
    Extents,
    HeaderWrite,
    RankWritePlan,
    parse_size,
    plan_layout,
    with_header_metadata,
)
from dcp_safetensors.mapping import check_prefix, without_prefix
from dcp_safetensors.names import SNAPSHOT_KEY
from dcp_safetensors.planner import ALIASES_KEY
from dcp_safetensors.progress import STALL_WARNING, Progress
from dcp_safetensors.rank_writes import WrittenObject, resolve_writes
from dcp_safetensors.saving import LayoutSave, RunWrite, WrittenParts, write_in_place, write_parts
from dcp_safetensors.storage import SaveSession, Storage, open_storage
from dcp_safetensors.storage.base import PartWriter, RunWriter

__all__ = ["SafetensorsWriter"]

logger = logging.getLogger("dcp_safetensors")

PARALLEL_FILES = 8
"""Most files the default ``min_files`` asks for on POSIX: a GPU node's ranks.

Linux serialises buffered writes to one file, per node; with at least as
many files as a node has ranks, each rank starting at another file
(:func:`~.layout.plan.plan_layout`), a node's ranks write apart. More files
only add names to a Hub upload.
"""


@dataclass(frozen=True)
class _RankStorageData:
    """What the coordinator sends each rank in ``SavePlan.storage_data``.

    ``layout_id`` names the layout ``writes`` come from, so a rank can tell
    that a reused plan (:class:`_Refresh`) belongs to the layout it cached.
    """

    session: SaveSession
    writes: RankWritePlan
    layout_id: str
    options: dict[str, Any]


@dataclass(frozen=True)
class _Refresh:
    """A reused plan (plan caching): the new snapshot's session and this rank's headers.

    The planner applies it to the rank's cached final plan
    (:class:`~dcp_safetensors.hooks.PlanRefresh`), whose session and
    headers belong to the last save's snapshot.
    """

    session: SaveSession
    headers: tuple[HeaderWrite, ...]
    layout_id: str
    options: dict[str, Any]

    def applies_to(self, cached: Any) -> bool:
        return isinstance(cached, _RankStorageData) and cached.layout_id == self.layout_id

    def apply(self, cached: _RankStorageData) -> _RankStorageData:
        writes = dataclasses.replace(cached.writes, headers=self.headers)
        return _RankStorageData(self.session, writes, self.layout_id, self.options)


class SafetensorsWriter(StorageWriter):
    """Save a (sharded) state dict as a Hugging Face safetensors checkpoint.

    Args:
        path: checkpoint directory (created if missing). ``dcp.save``'s
            ``checkpoint_id`` overrides it.
        max_shard_size: most tensor bytes per file, as transformers reads it
            (an int, ``"5GB"``, ``"2GiB"``); a larger tensor sits alone.
        min_files: cut the weights (and the training state) into at least
            this many files, each at least 16 MiB. ``None``: on POSIX
            storage, one per rank up to :data:`PARALLEL_FILES`, because
            Linux serialises writes to one file, so ranks that share a
            file write at the speed of one (2.5x slower measured, see
            ``docs/benchmarks.md``); 1 on object stores, where files don't
            contend. Pass 1 for the fewest files.
        model_prefix: if set (e.g. ``"model"``), only keys under ``"model."``
            go to the HF files, without the prefix; every other tensor
            (optimizer state) goes to ``training_state/`` files that the
            weight map does not list, and non-tensor values to
            ``training_state/objects.json``.
        storage_options: for an fsspec URL (``s3://...``), what its
            filesystem takes (``key``, ``secret``, ``client_kwargs``, ...).
        process_group: the group ``dcp.save`` runs on (default: world); byte
            transfers between ranks (object stores) run on it.
        max_part: largest part one rank writes (a file) or uploads (an object
            store) at once; parts are checksummed and written concurrently.
        transfer_budget: most bytes a rank sends or receives per transfer round.
        row_exchange_below: POSIX: column shards whose runs (one per row) are
            shorter than this many bytes are swapped between their ranks and
            written as whole-row blocks, not a ``pwrite`` per row (0: never;
            the default is measured on CPU ranks, see ``layout.row_blocks``).
        write_threads: concurrent part writes/uploads per rank.
        hf_config: the transformers model (best: ``config.json`` then names its class in
            ``architectures``, and a generating model's ``generation_config.json`` comes along),
            its config (anything with ``to_dict()``) or a dict; written as ``save_pretrained``
            writes it, ``dtype`` from the saved weights, in the same commit as the weights.
        generation_config: likewise, written as ``generation_config.json``.
        strip_auto_map: drop ``auto_map`` from the config (it points at custom
            code that is not in the checkpoint directory).
        stall_warning: seconds without a byte written before a rank logs a WARNING saying
            what it waits on, again every as many seconds (:mod:`.progress`); None: never.

    See the module docstring for the order in which DCP calls the methods.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_size: int | str = "5GB",
        min_files: int | None = None,
        model_prefix: str | None = None,
        storage_options: dict[str, Any] | None = None,
        process_group: dist.ProcessGroup | None = None,
        max_part: int = 64 << 20,
        transfer_budget: int = 256 << 20,
        row_exchange_below: int = SMALL_RUN,
        write_threads: int = 8,
        hf_config: Any = None,
        generation_config: Any = None,
        strip_auto_map: bool = True,
        stall_warning: float | None = STALL_WARNING,
    ) -> None:
        super().__init__()
        parse_size(max_shard_size)  # fail at construction, not mid-save
        check_prefix(model_prefix, "model_prefix")
        self.path = os.fspath(path)
        self.max_shard_size = max_shard_size
        if min_files is not None and min_files < 1:
            raise ConfigurationError(f"min_files must be at least 1 (or None for the default), not {min_files}")
        self.min_files = min_files
        self.model_prefix = model_prefix
        self.storage_options = storage_options
        self.process_group = process_group
        self.max_part = max_part
        self.transfer_budget = transfer_budget
        self.row_exchange_below = row_exchange_below
        self.write_threads = write_threads
        self.stall_warning = stall_warning
        self._extra_files = config_files(hf_config, generation_config, strip_auto_map)
        self._save: LayoutSave | None = None
        self._started = 0.0
        self._phases: dict[str, float] = {}
        self._store: Storage | None = None

    def __getstate__(self) -> dict[str, Any]:
        # async_save(PROCESS) pickles the writer into a process with a fresh default
        # group: a process group handle does not travel, the default group is used there.
        # Nor does a storage client (sockets, an event loop): the process opens its own.
        state = dict(self.__dict__)
        state["process_group"] = None
        state["_store"] = None
        return state

    # -- DCP protocol -------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._save = None
        self._store = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def _storage(self) -> Storage:
        # One per save: the storage's client (an S3 session, its connection pool) is made
        # once per rank, not once per step (each costs 0.1-0.3 s before its first request).
        if self._store is None:
            self._store = open_storage(self.path, self.storage_options, max_part=self.max_part)
        return self._store

    def set_up_storage_writer(self, is_coordinator: bool, **kwargs: Any) -> None:
        self._started = time.perf_counter()
        self._phases = {}
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not kwargs.get("use_collectives", True) and world > 1:
            raise ConfigurationError(
                "SafetensorsWriter needs use_collectives=True with more than one rank: "
                "the file layout is planned from every rank's chunks"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # DCP's dedup drops all but one copy of a replicated item before the coordinator
        # sees it, so a plain tensor whose shape or dtype differs between ranks would be
        # saved silently from one of them. Each rank declares what it holds; the
        # coordinator compares the declarations.
        declared = {
            item.index.fqn: (to_safetensors_dtype(item.tensor_data.properties.dtype, key=item.index.fqn), tuple(item.tensor_data.size))
            for item in plan.items
            if item.tensor_data is not None
        }
        return dataclasses.replace(plan, storage_data=declared)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        started = time.perf_counter()
        storage = self._storage()
        snapshot = uuid.uuid4().hex
        metadata = {"format": "pt", SNAPSHOT_KEY: snapshot}
        planned = plans[0].planner_data if plans and isinstance(plans[0].planner_data, PlannedSave) else None
        if planned is not None:  # the planner's hand-off stays on the coordinator
            plans = [dataclasses.replace(plans[0], planner_data=None), *plans[1:]]
        if any(not p.usable for p in plans):
            raise ConfigurationError(
                "the planner sent empty cached plans (DCP's enable_plan_caching), whose storage data belongs to an "
                "earlier save's snapshot; pass planner=SafetensorsSavePlanner(enable_plan_caching=True), which "
                "caches plans with this writer"
            )
        options = self._agreed_options()
        # What the layout depends on (not the path: a layout serves every step's directory).
        settings = (type(storage).__name__, storage.min_part, storage.max_part, options["max_shard_size"],
                    self.min_files, self.model_prefix, self.transfer_budget, self.row_exchange_below, len(plans))
        cache = planned.cache if planned is not None else None
        cached = cache.layout(settings) if cache is not None and planned is not None and planned.unchanged else None
        if cached is not None:
            # No rank's plan changed and the writer's settings are the same: only the
            # snapshot (its id in every header, its session) is new.
            layout = with_header_metadata(cached.layout, metadata)
            self._save = save = LayoutSave(storage, layout, snapshot)
            self._phases["plan"] = time.perf_counter() - started
            logger.debug("plan unchanged: reused the layout of %d files in %.3f s", len(layout.files), self._phases["plan"])
            return [
                SavePlan([], storage_data=_Refresh(save.session, layout.rank_plans[rank].headers, cached.layout_id, options),
                         usable=False)
                for rank in range(len(plans))
            ]
        layout = self._plan(plans, planned.table if planned is not None else None, metadata, storage)
        layout_id = uuid.uuid4().hex
        if cache is not None:
            cache.keep_layout(settings, layout_id, layout)
        self._save = save = LayoutSave(storage, layout, snapshot)
        self._phases["plan"] = time.perf_counter() - started
        logger.debug(
            "planned %d files, %d tensors, %.1f MB; %.1f MB to move between ranks; in %.3f s",
            len(layout.files),
            len(layout.tensors),
            sum(f.size for f in layout.files) / 1e6,
            layout.moved_bytes / 1e6,
            self._phases["plan"],
        )
        return [
            dataclasses.replace(plan, storage_data=_RankStorageData(save.session, layout.rank_plans[rank], layout_id, options))
            for rank, plan in enumerate(plans)
        ]

    def _plan(
        self, plans: list[SavePlan], table: dict[str, ChunkArrays] | None, metadata: dict[str, str], storage: Storage
    ) -> CheckpointLayout:
        # A table handed over by SafetensorsSavePlanner was proved to tile every tensor there.
        checked = table is not None
        if table is None:
            _, table, _ = collect_chunks(plans)
        return plan_layout(
            declared_specs(plans, self.model_prefix),
            table,
            max_shard_size=self.max_shard_size,
            metadata=metadata,
            min_part=storage.min_part,
            max_part=storage.max_part,
            transfer_budget=self.transfer_budget,
            world_size=len(plans),
            tiling_checked=checked,
            in_place=storage.min_part == 1,
            small_run=self.row_exchange_below,
            min_files=self._min_files(storage, len(plans)),
        )

    def _min_files(self, storage: Storage, world_size: int) -> int:
        if self.min_files is not None:
            return self.min_files
        return min(world_size, PARALLEL_FILES) if storage.min_part == 1 else 1

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        write_started = time.perf_counter()
        data = plan.storage_data
        results: list[WriteResult] = []
        source = ByteSource()
        group = self.process_group
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        storage: Storage | None = None
        part_writer: PartWriter | None = None
        reports: list[WrittenParts] = []
        rank = data.writes.rank if isinstance(data, _RankStorageData) else 0
        progress = Progress(f"save of {self.path}", 0, rank=rank, stall_warning=self.stall_warning)
        try:
            # Every rank reaches every collective below, failed or not: any local error
            # (opening the storage included) is carried to the next status exchange, so
            # all ranks raise together instead of waiting for a rank that left.
            error: Exception | None = None
            if not isinstance(data, _RankStorageData):
                # A rank without its plan cannot know the transfer rounds; the first status
                # exchange (every rank's next collective, whatever its rounds) says so to all.
                error = _unusable_plan(data)
                if distributed:
                    agree_on_errors(error, group, "the transfers")
                raise error
            try:
                # Every rank checks its options against the coordinator's, also for a reused plan.
                mine, coordinator = self._agreed_options(), dict(data.options)
                if not self._extra_files:  # the coordinator writes config.json: other ranks may pass none
                    mine.pop("config files"), coordinator.pop("config files")
                check_against_coordinator("SafetensorsWriter", data.writes.rank, mine, coordinator)
                storage = self._storage()
                writes, held, shares = resolve_writes(plan, planner, data.writes, results)
                results.append(WriteResult(MetadataIndex(f"__blocks__/{data.writes.rank}"), 0, shares))
                part_writer = storage.part_writer(data.session)
                if data.writes.in_place and not isinstance(part_writer, RunWriter):
                    raise ConfigurationError(f"{type(storage).__name__} cannot write runs in place; its plan needs parts")
                progress.total = _bytes_to_write(data.writes, writes)
                if not data.writes.in_place:
                    for w in writes:
                        for i, offset in enumerate(w.extents.offsets().tolist()):
                            source.add(w.file, offset, w.data[i * w.extents.length : (i + 1) * w.extents.length])
            except Exception as e:
                error = e
            progress.start()
            if data.writes.rounds:
                transfer_started = time.perf_counter()
                progress.doing = "exchanging bytes with the other ranks"
                transfer(data.writes.rounds, source, group, error)
                self._phases["transfer"] = time.perf_counter() - transfer_started
            if data.writes.row_rounds:
                # Short-run column chunks: swap columns so each rank writes whole rows, a round at a
                # time (each round's blocks are written before the next, so buffers stay in budget).
                device = collective_device(group)
                for number, slabs in enumerate(data.writes.row_rounds):
                    progress.doing = f"exchanging rows with the other ranks (round {number + 1})"
                    agree_on_errors(error, group, f"row exchange round {number + 1}")
                    blocks = exchange_rows(slabs, data.writes.rank, held, group, device)
                    try:
                        assert isinstance(part_writer, RunWriter)
                        runs = [RunWrite(f, Extents(o, b.size), memoryview(b)) for f, o, b in blocks]  # type: ignore[arg-type]
                        progress.doing = "writing"
                        reports.append(self._write_in_place(part_writer, data.writes, runs, progress))
                    except Exception as e:
                        error = e
            if error is None:
                assert part_writer is not None
                try:
                    progress.doing = "writing"
                    results.extend(self._write_parts(data, source, writes, part_writer, reports, progress))
                except Exception as e:
                    error = e
                finally:
                    part_writer = None
            # A last status exchange: a failed or dead rank (the collective itself then
            # fails) makes every rank abort the save's uploads, not only the failing one.
            if distributed:
                progress.doing = "waiting for the other ranks to finish writing"
                agree_on_errors(error, group, "commit")
            elif error is not None:
                raise error
        except BaseException:
            if part_writer is not None:
                with contextlib.suppress(Exception):
                    part_writer.close()
            if isinstance(data, (_RankStorageData, _Refresh)):
                (storage or self._storage()).abort_save(data.session)
            raise
        finally:
            progress.stop()
        self._phases["write"] = time.perf_counter() - write_started - self._phases.get("transfer", 0.0)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        commit_started = time.perf_counter()
        save = self._save
        if save is None:
            raise LayoutError("finish() called without prepare_global_plan() on this coordinator")
        written = [r.storage_data for rr in results for r in rr if isinstance(r.storage_data, WrittenParts)]
        objects = {r.index.fqn: r.storage_data.record for rr in results for r in rr if isinstance(r.storage_data, WrittenObject)}
        aliases = (metadata.planner_data or {}).get(ALIASES_KEY, {}) if isinstance(metadata.planner_data, dict) else {}
        save.commit(
            written,
            objects=objects,
            extra_files=with_weights_dtype(self._extra_files, save.layout.tensors),
            model_prefix=self.model_prefix,
            aliases=self._file_names(aliases, save.layout),
            blocks=[r.storage_data for rr in results for r in rr if isinstance(r.storage_data, BlockReport)],
        )
        self._phases["commit"] = time.perf_counter() - commit_started
        self._log_summary(len(save.layout.files), sum(f.size for f in save.layout.files))

    def _log_summary(self, files: int, nbytes: int) -> None:
        """One line per save on the coordinator: INFO when it took a second or more, else DEBUG."""
        total = time.perf_counter() - self._started
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in self._phases.items())
        logger.log(logging.INFO if total >= 1.0 else logging.DEBUG, "saved %s: %d files, %.1f MB in %.2f s (%.0f MB/s; %s)",
                   self.path, files, nbytes / 1e6, total, nbytes / 1e6 / max(total, 1e-9), phases)

    # -- helpers ------------------------------------------------------------------------

    def _agreed_options(self) -> dict[str, Any]:
        """The options every rank must share (checked in ``write_data``); thread counts may differ."""
        return {
            "path": self.path if "://" in self.path else os.path.abspath(self.path),
            "max_shard_size": parse_size(self.max_shard_size),
            "min_files": self.min_files,
            "model_prefix": self.model_prefix,
            "max_part": self.max_part,
            "transfer_budget": self.transfer_budget,
            "config files": {name: hashlib.sha256(body).hexdigest()[:16] for name, body in self._extra_files.items()},
        }

    def _file_names(self, aliases: dict[str, str], layout: CheckpointLayout) -> dict[str, str]:
        """Tied aliases as names in the files (model prefix stripped), for keys that were saved."""
        names = {s.key: s.name for s in layout.tensors}
        return {
            without_prefix(self.model_prefix, alias): names[kept] for alias, kept in sorted(aliases.items()) if kept in names
        }

    def _write_in_place(self, writer: RunWriter, plan: RankWritePlan, writes: list[RunWrite],
                        progress: Progress) -> WrittenParts:
        assert self._store is not None
        return write_in_place(writer, writes, plan.file_sizes, rank=plan.rank, threads=self.write_threads,
                              piece=self._store.max_part or self.max_part, progress=progress)

    def _write_parts(
        self, data: _RankStorageData, source: ByteSource, writes: list[RunWrite], writer: PartWriter,
        reports: list[WrittenParts], progress: Progress,
    ) -> list[WriteResult]:
        """Write this rank's bytes, CRC-32 them, concurrently: in place (POSIX), or the parts it owns (pwrite / UploadPart).

        ``reports`` holds what the row exchange rounds already wrote; closing the writer makes it all durable.
        """
        plan = data.writes
        try:
            if plan.in_place:
                assert isinstance(writer, RunWriter)
                reports.append(self._write_in_place(writer, plan, writes, progress))
            else:
                out = write_parts(writer, plan.parts, lambda p: source.read(p.file, p.start, p.end - p.start),
                                  self.write_threads, progress)
                reports.append(WrittenParts.of(out))
        finally:
            writer.close()
        return [
            WriteResult(MetadataIndex(f"__parts__/{plan.rank}/{i}"), r.nbytes, r)
            for i, r in enumerate(reports)
            if len(r.rows) or len(r.in_place)
        ]


def _bytes_to_write(plan: RankWritePlan, writes: list[RunWrite]) -> int:
    """What this rank writes: its parts, or its runs in place and its blocks of the row exchange."""
    if not plan.in_place:
        return plan.nbytes
    blocks = [s.blocks()[s.ranks.index(plan.rank)] + (s.row_bytes,) for rnd in plan.row_rounds for s in rnd]
    return sum(w.data.nbytes for w in writes) + sum((b - a) * row for a, b, row in blocks)


def _unusable_plan(data: Any) -> LayoutError:
    """The error for a plan ``write_data`` cannot carry out; the next save plans from scratch."""
    if isinstance(data, _Refresh):
        return LayoutError(
            f"plan caching: the coordinator reused the plan of layout {data.layout_id}, which this rank's planner "
            "does not hold (use one planner per rank for every save); refusing to write. The next save plans from scratch"
        )
    return LayoutError(
        f"write_data got a plan without this writer's storage data ({type(data).__name__}): the plan was not "
        "made by SafetensorsWriter.prepare_global_plan"
    )
