"""Mapping between torch dtypes and safetensors dtype names.

Example:
    >>> import torch
    >>> to_safetensors_dtype(torch.bfloat16), to_torch_dtype("F8_E4M3")
    ('BF16', torch.float8_e4m3fn)
"""

from __future__ import annotations

import torch

from dcp_safetensors.errors import LayoutError, UnknownDtypeError

__all__ = ["to_safetensors_dtype", "to_torch_dtype"]

_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}


def to_safetensors_dtype(dtype: torch.dtype, *, key: str = "") -> str:
    """The safetensors name of ``dtype``; :class:`LayoutError` naming ``key`` if there is none.

    Example:
        >>> to_safetensors_dtype(torch.float32)
        'F32'
    """
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise LayoutError(
            f"tensor {key!r} has dtype {dtype}, which safetensors cannot store; "
            f"supported: {', '.join(str(d) for d in _TORCH_TO_ST)}"
        ) from None


def to_torch_dtype(name: str, *, source: str = "") -> torch.dtype:
    """The torch dtype for safetensors dtype ``name``.

    Example:
        >>> to_torch_dtype("BOOL")
        torch.bool
    """
    try:
        return _ST_TO_TORCH[name]
    except KeyError:
        raise UnknownDtypeError(f"{source}: dtype {name!r} has no torch equivalent") from None
