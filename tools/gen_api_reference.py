"""Write docs/api.md from the public docstrings (python tools/gen_api_reference.py)."""

from __future__ import annotations

import inspect
import os

import dcp_safetensors
from dcp_safetensors import errors

HEADER = "# API reference\n\nGenerated from the docstrings by `tools/gen_api_reference.py`; do not edit by hand.\n"


def render(obj: object, name: str) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        sig = str(inspect.signature(obj.__init__)).replace("(self, ", "(").replace("(self)", "()")  # type: ignore[misc]
        return f"## class `{name}{sig}`\n\n{doc}\n"
    return f"## `{name}{inspect.signature(obj)}`\n\n{doc}\n"  # type: ignore[arg-type]


def main() -> str:
    parts = [HEADER]
    for name in dcp_safetensors.__all__:
        obj = getattr(dcp_safetensors, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            continue
        parts.append(render(obj, name))
    parts.append("## Errors\n")
    for name, obj in inspect.getmembers(errors, inspect.isclass):
        if issubclass(obj, errors.DcpSafetensorsError) and obj.__module__ == errors.__name__:
            base = obj.__mro__[1].__name__
            parts.append(f"* `{name}({base})`: {inspect.getdoc(obj)}")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")
    with open(out, "w") as f:
        f.write(main())
    print(f"wrote {os.path.normpath(out)}")
