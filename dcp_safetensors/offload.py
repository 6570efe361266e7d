"""Saving models whose weights are offloaded (on the ``meta`` device, data elsewhere).

accelerate's CPU/disk offload (``device_map="auto"``, ``cpu_offload``) leaves
parameters on ``meta`` and keeps their data in each module's
``AlignDevicesHook.weights_map``. :func:`accelerate_resolver` finds that data
for a state-dict key by the longest module-name prefix carrying such a hook,
so ``SafetensorsSavePlanner(meta_resolver=accelerate_resolver(model))`` saves
the real weights instead of failing on (or silently skipping) meta tensors.

Example:
    >>> import torch
    >>> from accelerate import cpu_offload
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> expected = model[0].weight.detach().clone()
    >>> _ = cpu_offload(model, execution_device="cpu")
    >>> model[0].weight.is_meta
    True
    >>> resolve = accelerate_resolver(model)
    >>> torch.equal(resolve("0.weight", model[0].weight), expected)
    True
"""

from __future__ import annotations

import torch

from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.planner import MetaResolver

__all__ = ["accelerate_resolver"]


def accelerate_resolver(model: torch.nn.Module) -> MetaResolver:
    """A ``meta_resolver`` reading offloaded weights from accelerate's hooks on ``model``'s modules."""
    maps = {}
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        # SequentialHook wraps several hooks; any of them may hold the offloaded weights.
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights_map = getattr(h, "weights_map", None)
            if weights_map is not None and getattr(h, "offload", False):
                maps[name] = weights_map

    def resolve(key: str, meta: torch.Tensor) -> torch.Tensor:
        parts = key.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in maps:
                try:
                    return maps[prefix][".".join(parts[cut:])]
                except KeyError:
                    continue
        raise ConfigurationError(
            f"tensor {key!r} is on the meta device and no accelerate offload hook holds its data "
            f"(hooked modules: {', '.join(sorted(maps)[:10]) or 'none'})"
        )

    return resolve
