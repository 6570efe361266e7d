"""What our writer and reader expect of a planner beyond DCP's ``SavePlanner``/``LoadPlanner``.

One ``Protocol`` per hook, so a newcomer sees every contract between our
planners and our storage classes in one place, and the storage classes test
for a contract (``isinstance``), not for an attribute name. DCP's default
planners work with our writer and reader without any of them: a hook only
adds what its docstring says.

Example:
    >>> from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
    >>> from dcp_safetensors import SafetensorsLoadPlanner
    >>> isinstance(DefaultSavePlanner(), ObjectSource), isinstance(DefaultLoadPlanner(), RankZeroBroadcast)
    (True, False)
    >>> isinstance(SafetensorsLoadPlanner(), RankZeroBroadcast)
    True
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch.distributed.checkpoint.metadata import MetadataIndex

__all__ = ["ObjectSource", "RankZeroBroadcast", "PlanRefresh"]


@runtime_checkable
class ObjectSource(Protocol):
    """A save planner that hands out a non-tensor value as it is (DCP's ``DefaultSavePlanner`` does).

    The writer stores such values as JSON (or ``weights_only``-safe bytes)
    instead of the pickle ``resolve_data`` would give it; a planner without
    this hook cannot save non-tensor values with our writer.
    """

    def lookup_object(self, index: MetadataIndex) -> Any:
        """The state dict's value at ``index``."""


@runtime_checkable
class RankZeroBroadcast(Protocol):
    """A load planner whose plain tensors ``broadcast_keys`` rank 0 reads and broadcasts.

    The reader calls ``broadcast_after_read`` on every rank after its own
    reads, with the error of those reads if any, so every rank takes part in
    the broadcast's collectives, failed or not.
    """

    broadcast_keys: list[str]

    def broadcast_after_read(self, error: BaseException | None) -> None:
        """Agree on ``error``, then broadcast rank 0's tensors into every rank's state dict."""


@runtime_checkable
class PlanRefresh(Protocol):
    """``SavePlan.storage_data`` the writer sends a rank whose plan it reuses (plan caching).

    ``applies_to`` says whether the storage data of the rank's cached final
    plan is the one the coordinator reused; ``apply`` then returns this
    save's: the cached plan with the new snapshot's session and headers. A
    refresh that applies to nothing the rank holds is passed on unapplied,
    and the writer's ``write_data`` refuses it on every rank together.
    """

    def applies_to(self, cached: Any) -> bool:
        """Whether ``cached`` (storage data of the rank's cached final plan) is the plan reused."""

    def apply(self, cached: Any) -> Any:
        """This save's storage data, made from ``cached``."""
