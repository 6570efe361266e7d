"""Plan caching: a repeat save of an unchanged state dict is not planned again.

Saving the same model every N steps gives the same plan every time; at 1,024
ranks, gathering and planning it costs seconds (docs/benchmarks.md). With one
``SafetensorsSavePlanner(enable_plan_caching=True)`` per rank, *reused* for
every save, a rank whose local plan did not change sends a digest instead of
its plan, the coordinator reuses the global plans and the writer's layout, and
each rank reuses its final plan with the new snapshot's session and headers.

What "unchanged" means is decided here, from a digest of everything the byte
layout depends on: every item's key, type, chunk offsets and sizes, global
shape and tensor properties (the dtype), in order; the plan's planner data
(tied aliases, flattening); the planner's options. DCP's own plan comparison
ignores dtypes, so a bf16 -> fp16 cast between two saves kept a BF16 header
over fp16 bytes: it is not used.

Every cached piece is *confirmed* only once the coordinator's plan reached
the rank (``finish_plan``), on every rank and on the coordinator alike, so a
save that failed while planning leaves no half-updated cache; a rank that
offers its digest gives up its confirmed plan until the save confirms it
again. Each reuse is cross-checked: the coordinator compares every rank's
digest with the one it confirmed for that rank, and every rank compares the
id of the layout the coordinator reused with the one of its own cached plan.
A mismatch is an error (the next save then plans from scratch), never a
stale layout.

All state lives on the planner instance (:class:`SaveCache`), nothing is
module-level: a fresh planner never reuses anything.

Example:
    >>> import torch
    >>> from torch.distributed.checkpoint.planner import SavePlan
    >>> from torch.distributed.checkpoint.planner_helpers import _create_write_items
    >>> plan = SavePlan(_create_write_items("w", torch.ones(4, dtype=torch.bfloat16)))
    >>> cast = SavePlan(_create_write_items("w", torch.ones(4, dtype=torch.float16)))
    >>> plan_digest(plan, "opts") == plan_digest(cast, "opts")
    False
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan

from dcp_safetensors.agreement import check_agreement
from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.hooks import PlanRefresh
from dcp_safetensors.layout import CheckpointLayout, ChunkArrays

__all__ = ["SaveCache", "LocalPlanData", "plan_digest", "expand_local_plans"]


def plan_digest(plan: SavePlan, options: str) -> str:
    """A digest of everything in a local save plan that the checkpoint's bytes depend on.

    ``options`` names the planner's settings. Items are taken in order: the
    order decides where tensors go, so a reordered state dict is a new plan.
    """
    h = hashlib.blake2b(options.encode(), digest_size=16)
    for item in plan.items:
        td = item.tensor_data
        row: tuple[Any, ...] = (item.index.fqn, tuple(item.index.offset or ()), item.type.name)
        if td is not None:
            row += (tuple(td.chunk.offsets), tuple(td.chunk.sizes), tuple(td.size), repr(td.properties))
        h.update(repr(row).encode())
        h.update(b"\n")
    h.update(repr(plan.planner_data).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class LocalPlanData:
    """``SavePlan.planner_data`` of a local plan made by our planner.

    ``options`` are the planner's options (:func:`~dcp_safetensors.agreement.describe`),
    compared across ranks by the coordinator. With plan caching, ``digest``
    is the plan's :func:`plan_digest`, and ``unchanged`` says the plan equals
    the rank's last confirmed one, so the plan sent is empty and the
    coordinator uses its own copy. ``planner_data`` is the plan's own planner
    data (tied aliases, flattening), restored before the metadata is built.
    """

    options: dict[str, Any]
    digest: str | None = None
    unchanged: bool = False
    planner_data: Any = None


@dataclass(frozen=True)
class _RankRecord:
    """What the coordinator keeps of one rank's local plan."""

    digest: str | None
    plan: SavePlan
    options: dict[str, Any] | None


def expand_local_plans(
    plans: Sequence[SavePlan], cache: SaveCache | None
) -> tuple[list[SavePlan], list[_RankRecord], GlobalRecord | None]:
    """The coordinator's full local plans, unchanged ones taken from ``cache``; options agreed.

    Returns the plans (each with its own planner data back), the records to
    keep for the next save, and the confirmed global step if every rank's
    plan is unchanged from it (reuse it as it is). Raises
    :class:`ConfigurationError` naming the ranks if the planners' options
    differ between ranks, or if a rank sent a digest the cache does not hold
    for it (planners that differ between ranks, or a coordinator that lost
    its cache); every rank then plans from scratch on the next save.
    """
    confirmed = cache.take_global(len(plans)) if cache is not None else None
    out: list[SavePlan] = []
    kept: list[_RankRecord] = []
    missing = []
    unchanged = True
    for rank, plan in enumerate(plans):
        tag = plan.planner_data
        if not isinstance(tag, LocalPlanData):  # another planner
            unchanged = False
            out.append(plan)
            kept.append(_RankRecord(None, plan, None))
        elif tag.unchanged:
            record = confirmed.records[rank] if confirmed is not None else None
            if record is None or record.digest != tag.digest:
                missing.append(rank)
                continue
            out.append(record.plan)
            kept.append(record)
        else:
            unchanged = False
            full = replace(plan, planner_data=tag.planner_data)
            out.append(full)
            kept.append(_RankRecord(tag.digest, full, tag.options))
    if missing:
        raise ConfigurationError(
            f"plan caching: ranks {missing} sent an unchanged plan that the coordinator has not cached for them "
            f"({'its planner does not cache plans' if cache is None else 'its last confirmed plans differ'}); "
            "use one SafetensorsSavePlanner(enable_plan_caching=True) per rank for every save, on every rank alike. "
            "The next save plans from scratch"
        )
    check_agreement("SafetensorsSavePlanner", [r.options for r in kept])
    return out, kept, confirmed if unchanged else None


@dataclass(frozen=True)
class GlobalRecord:
    """The coordinator's global step of one save: every rank's record, the kept plans, metadata, chunk table."""

    records: list[_RankRecord]
    plans: list[SavePlan]
    metadata: Metadata
    table: dict[str, ChunkArrays]


@dataclass(frozen=True)
class _LayoutRecord:
    """The writer's last layout, with the settings it was planned for and its id."""

    settings: tuple[Any, ...]
    layout_id: str
    layout: CheckpointLayout


@dataclass
class _Pending:
    """What one save confirms in ``finish_plan``: this rank's digest and final plan; the coordinator's steps."""

    digest: str | None = None
    final: SavePlan | None = None  # the rank's cached final plan, when it sent its digest only
    global_record: GlobalRecord | None = None
    layout: _LayoutRecord | None = None  # planned from global_record's plans


class SaveCache:
    """The plans and layout of the last confirmed save, held by one planner instance.

    Every rank keeps its local plan's digest and its final plan; the
    coordinator also keeps every rank's local plan, the global plans, their
    metadata and chunk table, and the writer's layout of those plans for one
    writer setting. Nothing is confirmed before :meth:`confirm` (the
    planner's ``finish_plan``).
    """

    def __init__(self) -> None:
        self._digest: str | None = None
        self._final: SavePlan | None = None
        self._global: GlobalRecord | None = None
        self._layout: _LayoutRecord | None = None
        self._pending = _Pending()

    # -- every rank --------------------------------------------------------------------

    def offer(self, plan: SavePlan, options: dict[str, Any]) -> SavePlan:
        """The plan to send for local ``plan``: empty with its digest if it equals the confirmed one."""
        digest = plan_digest(plan, repr(options))
        confirmed, final = self._digest, self._final
        # Given up until this save confirms: a save that fails before finish_plan
        # leaves this rank sending its whole plan next time.
        self._digest = self._final = None
        if confirmed == digest and final is not None:
            self._pending = _Pending(digest, final)
            return SavePlan([], planner_data=LocalPlanData(options, digest, True), usable=False)
        self._pending = _Pending(digest)
        return replace(plan, planner_data=LocalPlanData(options, digest, False, plan.planner_data))

    def confirm(self, central: SavePlan) -> SavePlan:
        """This rank's final plan from the coordinator's ``central`` one; confirms what this save planned."""
        pending, self._pending = self._pending, _Pending()
        final = central
        refresh = central.storage_data
        if isinstance(refresh, PlanRefresh):
            base = pending.final
            if base is None or not refresh.applies_to(base.storage_data):
                return central  # nothing confirmed: write_data refuses it, the next save plans afresh
            final = replace(base, storage_data=refresh.apply(base.storage_data))
        if pending.digest is not None:
            self._digest, self._final = pending.digest, final
        if pending.global_record is not None:
            self._global, self._layout = pending.global_record, pending.layout
        return final

    # -- the coordinator ---------------------------------------------------------------

    def take_global(self, world: int) -> GlobalRecord | None:
        """The confirmed global step, if it had ``world`` ranks; given up until this save confirms.

        Its layout stays a candidate for this save, valid while the global
        plans are reused (:meth:`keep_global` with ``reused``).
        """
        record, self._global = self._global, None
        self._pending.layout, self._layout = self._layout, None
        return record if record is not None and len(record.records) == world else None

    def keep_global(self, record: GlobalRecord, reused: bool) -> None:
        """This save's global step; a layout planned from other plans is no longer a candidate."""
        self._pending.global_record = record
        if not reused:
            self._pending.layout = None

    def layout(self, settings: tuple[Any, ...]) -> _LayoutRecord | None:
        """The candidate layout, if it was planned with the same writer ``settings``."""
        record = self._pending.layout
        return record if record is not None and record.settings == settings else None

    def keep_layout(self, settings: tuple[Any, ...], layout_id: str, layout: CheckpointLayout) -> None:
        """The layout the writer planned for this save's global plans."""
        self._pending.layout = _LayoutRecord(settings, layout_id, layout)
