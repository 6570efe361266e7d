"""``config.json`` and ``generation_config.json``: written as ``save_pretrained`` writes them.

:func:`config_files` turns the configs a user passes to
:class:`~dcp_safetensors.SafetensorsWriter` into file bodies, committed with
the weights; :func:`with_torch_dtype` sets a config's dtype to the weights'
(the writer, at commit) or to the cast one
(:func:`~dcp_safetensors.convert.convert`).

``save_pretrained`` writes a config's differences from its class's defaults
(``to_diff_dict``), ``architectures`` from the model's class and ``dtype``
from its weights. Given the model (``hf_config=model``), we write the same;
given only a config built from scratch, its ``architectures`` stays null,
which vLLM resolves to the base model class, and a warning says so.

Example:
    >>> body = config_files({"model_type": "llama", "auto_map": {"x": "y"}}, None, strip_auto_map=True)
    >>> body["config.json"]
    b'{\\n  "model_type": "llama"\\n}\\n'
    >>> with_torch_dtype(b'{"torch_dtype": "float32"}', "BF16")
    b'{\\n  "torch_dtype": "bfloat16"\\n}\\n'
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.names import CONFIG_FILES, MODEL_GROUP

__all__ = ["config_files", "with_torch_dtype", "with_weights_dtype", "weights_dtype"]

logger = logging.getLogger("dcp_safetensors")

_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _model_class_name(model: Any) -> str:
    """The model's class as ``save_pretrained`` names it: FSDP2's ``fully_shard`` subclasses it as ``FSDP<name>``."""
    cls = type(model)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        cls = cls.__bases__[1]
    return cls.__name__


def _config_body(config: Any) -> dict[str, Any]:
    """What ``save_pretrained`` writes of a config: its differences from the defaults, when it can tell them."""
    if isinstance(config, dict):
        return dict(config)
    if callable(getattr(config, "to_diff_dict", None)):
        return dict(config.to_diff_dict())
    return dict(config.to_dict())


def _encode(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def config_files(hf_config: Any, generation_config: Any, strip_auto_map: bool) -> dict[str, bytes]:
    """``{file name: body}`` for the configs given (a transformers config, anything with ``to_dict()``, or a dict).

    ``strip_auto_map`` drops ``auto_map``, which points at custom code that is
    not in the checkpoint directory. Raises :class:`ConfigurationError` for
    anything else or a config that is not JSON-serialisable.
    """
    out = {}
    architectures = None
    if hasattr(hf_config, "config") and callable(getattr(hf_config, "state_dict", None)):  # a model, not a config
        architectures = [_model_class_name(hf_config)]
        if generation_config is None and callable(getattr(hf_config, "can_generate", None)) and hf_config.can_generate():
            generation_config = getattr(hf_config, "generation_config", None)
        hf_config = hf_config.config
    for name, config in zip(CONFIG_FILES, (hf_config, generation_config)):
        if config is None:
            continue
        if not isinstance(config, dict) and not callable(getattr(config, "to_dict", None)):
            raise ConfigurationError(
                f"{name}: expected a transformers model or config, or a dict, got {type(config).__name__}"
            )
        body = _config_body(config)
        if strip_auto_map:
            body.pop("auto_map", None)
        if name == CONFIG_FILES[0]:
            if architectures is not None:
                body["architectures"] = architectures
            elif body.get("model_type") and not body.get("architectures"):
                logger.warning(
                    "config.json gets no architectures (the config was built, not loaded): vLLM and AutoModel then "
                    "pick the base model class (LlamaModel for LlamaForCausalLM); pass hf_config=model to write the "
                    "model's class as save_pretrained does"
                )
        try:
            out[name] = _encode(body)
        except TypeError as e:
            raise ConfigurationError(f"{name}: not JSON-serialisable ({e})") from None
    return out


def weights_dtype(dtypes_and_bytes: Any) -> str | None:
    """The floating dtype holding most of the weights' bytes (safetensors name), or None: ``save_pretrained``'s
    ``dtype``, which it takes from the first floating parameter (in HF models, a bulk weight's dtype).

    Example:
        >>> weights_dtype([("BF16", 1000), ("F32", 64), ("I64", 4000)])
        'BF16'
    """
    totals: dict[str, int] = {}
    for dtype, nbytes in dtypes_and_bytes:
        if dtype in _TORCH_DTYPE_NAMES:
            totals[dtype] = totals.get(dtype, 0) + nbytes
    return max(totals, key=lambda d: totals[d]) if totals else None


def with_weights_dtype(files: dict[str, bytes], tensors: Any) -> dict[str, bytes]:
    """``files`` with config.json's ``dtype`` set to that of the weights among ``tensors`` (``TensorSpec``\\s),
    as ``save_pretrained`` sets it from the model's parameters."""
    dtype = weights_dtype((t.dtype, t.nbytes) for t in tensors if t.group == MODEL_GROUP)
    return {name: with_torch_dtype(body, dtype, add=True) if name == CONFIG_FILES[0] else body for name, body in files.items()}


def with_torch_dtype(config: bytes, dtype: str | None, *, add: bool = False) -> bytes:
    """``config`` with its ``torch_dtype`` / ``dtype`` entry (where present) set to safetensors ``dtype``.

    With ``add``, a config with neither entry gets ``dtype`` (transformers' name since 4.56).
    A body that is not a JSON object comes back unchanged, as does one without an entry if not ``add``.
    """
    try:
        body = json.loads(config)
    except ValueError:
        return config
    if dtype is None or dtype not in _TORCH_DTYPE_NAMES or not isinstance(body, dict):
        return config
    keys = [k for k in ("torch_dtype", "dtype") if k in body] or (["dtype"] if add else [])
    if not keys:
        return config
    for k in keys:
        body[k] = _TORCH_DTYPE_NAMES[dtype]
    return _encode(body)
