"""``config.json`` and ``generation_config.json``: written as ``save_pretrained`` writes them.

:func:`config_files` turns the configs a user passes to
:class:`~dcp_safetensors.SafetensorsWriter` into file bodies, committed with
the weights; :func:`with_torch_dtype` updates a config's dtype when
:func:`~dcp_safetensors.convert.convert` casts the tensors.

Example:
    >>> body = config_files({"model_type": "llama", "auto_map": {"x": "y"}}, None, strip_auto_map=True)
    >>> body["config.json"]
    b'{\\n  "model_type": "llama"\\n}\\n'
    >>> with_torch_dtype(b'{"torch_dtype": "float32"}', "BF16")
    b'{\\n  "torch_dtype": "bfloat16"\\n}\\n'
"""

from __future__ import annotations

import json
from typing import Any

from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.names import CONFIG_FILES

__all__ = ["config_files", "with_torch_dtype"]

_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _encode(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def config_files(hf_config: Any, generation_config: Any, strip_auto_map: bool) -> dict[str, bytes]:
    """``{file name: body}`` for the configs given (a transformers config, anything with ``to_dict()``, or a dict).

    ``strip_auto_map`` drops ``auto_map``, which points at custom code that is
    not in the checkpoint directory. Raises :class:`ConfigurationError` for
    anything else or a config that is not JSON-serialisable.
    """
    out = {}
    for name, config in zip(CONFIG_FILES, (hf_config, generation_config)):
        if config is None:
            continue
        if isinstance(config, dict):
            body = dict(config)
        elif callable(getattr(config, "to_dict", None)):
            body = config.to_dict()
        else:
            raise ConfigurationError(f"{name}: expected a transformers config or a dict, got {type(config).__name__}")
        if strip_auto_map:
            body.pop("auto_map", None)
        try:
            out[name] = _encode(body)
        except TypeError as e:
            raise ConfigurationError(f"{name}: not JSON-serialisable ({e})") from None
    return out


def with_torch_dtype(config: bytes, dtype: str | None) -> bytes:
    """``config`` with its ``torch_dtype`` / ``dtype`` entry (where present) set to safetensors ``dtype``.

    A body that is not a JSON object, or has neither entry, comes back unchanged.
    """
    try:
        body = json.loads(config)
    except ValueError:
        return config
    if dtype is None or not isinstance(body, dict) or not {"torch_dtype", "dtype"} & body.keys():
        return config
    for k in ("torch_dtype", "dtype"):
        if k in body:
            body[k] = _TORCH_DTYPE_NAMES[dtype]
    return _encode(body)
