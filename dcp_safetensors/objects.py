"""Non-tensor training state (step counters, configs, scheduler state) without pickle.

A value whose type JSON keeps exactly (``int``, ``float``, ``bool``, ``None``,
``str``, ``list`` and ``dict`` with ``str`` keys, nested) is stored as JSON, so
``0`` stays ``int``, ``0.0`` ``float`` and ``False`` ``bool``. Any other value
(a tuple, ``torch.Size``, a tensor inside a dict) is stored as ``torch.save``
bytes and read back only with ``torch.load(weights_only=True)``, which refuses
to execute code from the checkpoint.

Example:
    >>> record = encode_object({"lr": 1e-4, "step": 0, "warm": False})
    >>> record
    {'json': {'lr': 0.0001, 'step': 0, 'warm': False}}
    >>> decode_object(record, key="cfg")
    {'lr': 0.0001, 'step': 0, 'warm': False}
    >>> decode_object(encode_object((0.9, 0.999)), key="betas")
    (0.9, 0.999)
"""

from __future__ import annotations

import base64
import io
from typing import Any

from dcp_safetensors.errors import CheckpointCorruptError

__all__ = ["encode_object", "decode_object", "is_json_exact"]


def is_json_exact(value: Any) -> bool:
    """Whether ``json.loads(json.dumps(value))`` gives back ``value`` with the same types.

    Example:
        >>> is_json_exact({"a": [1, 2.0, None]}), is_json_exact((1, 2)), is_json_exact({1: "a"})
        (True, False, False)
    """
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(is_json_exact(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and is_json_exact(v) for k, v in value.items())
    return False


def encode_object(value: Any) -> dict[str, Any]:
    """A JSON-serialisable record holding ``value`` (see the module docstring)."""
    if is_json_exact(value):
        return {"json": value}
    import torch  # here, not at import: the CLI's inspect and verify run without torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return {"torch_save": base64.b64encode(buffer.getvalue()).decode("ascii")}


def decode_object(record: Any, *, key: str, source: str = "objects.json") -> Any:
    """The value stored by :func:`encode_object`; never unpickles arbitrary code."""
    if isinstance(record, dict) and set(record) == {"json"}:
        return record["json"]
    if isinstance(record, dict) and set(record) == {"torch_save"} and isinstance(record["torch_save"], str):
        import torch

        try:
            raw = base64.b64decode(record["torch_save"], validate=True)
            return torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as e:
            raise CheckpointCorruptError(
                f"{source}: value of {key!r} cannot be loaded safely (weights_only=True): {e}"
            ) from None
    raise CheckpointCorruptError(f"{source}: entry for {key!r} is not a record this package writes: {str(record)[:200]}")
