"""Key rules: which state-dict keys a checkpoint holds, and under which names.

Pure data and functions, no torch: a :class:`KeyMapping` maps state-dict keys
to checkpoint names, in this order: ``include``/``exclude`` (globs or a
predicate) on the original key, ``strip_prefix``, ``rename`` (a dict or a
callable), ``add_prefix``. The same forward mapping serves saving (keys are
written under their names) and loading (each target key is looked up under
its name), so a rule is written once. Two keys that map to one name are an
error naming both.

Example:
    >>> m = KeyMapping(exclude=["*.rotary_emb.*"], strip_prefix="model", rename={"lm_head.weight": "head.weight"})
    >>> m.names(["model.layers.0.w", "model.rotary_emb.inv_freq", "model.lm_head.weight", "step"])
    {'model.layers.0.w': 'layers.0.w', 'model.lm_head.weight': 'head.weight', 'step': 'step'}
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from dcp_safetensors.errors import ConfigurationError

__all__ = ["KeyMapping", "MappingError"]


class MappingError(ConfigurationError):
    """Key rules that cannot be applied: two keys map to one name, or a rule is malformed."""


KeyFilter = Sequence[str] | Callable[[str], bool]
KeyRename = Mapping[str, str] | Callable[[str], str]


def _matches(rule: KeyFilter, key: str) -> bool:
    if callable(rule):
        return bool(rule(key))
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in rule)


@dataclass(frozen=True)
class KeyMapping:
    """State-dict key -> checkpoint name rules (see the module docstring).

    ``strip_prefix="model"`` removes a leading ``"model."``; keys without it
    keep their name. ``add_prefix`` prepends ``"<prefix>."``.
    """

    include: KeyFilter | None = None
    exclude: KeyFilter | None = None
    rename: KeyRename | None = None
    strip_prefix: str | None = None
    add_prefix: str | None = None

    def __post_init__(self) -> None:
        for name in ("strip_prefix", "add_prefix"):
            value = getattr(self, name)
            if value is not None and (not value or value.endswith(".")):
                raise MappingError(f"{name} must be a key prefix without a trailing dot, got {value!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise MappingError(f"{name} must be a list of globs or a callable, not the string {value!r}")

    @property
    def is_identity(self) -> bool:
        return self == KeyMapping()

    def name_of(self, key: str) -> str | None:
        """The checkpoint name of ``key``, or None if the rules leave it out.

        Example:
            >>> KeyMapping(include=["draft.*"], strip_prefix="draft").name_of("draft_head.w") is None
            True
        """
        if self.include is not None and not _matches(self.include, key):
            return None
        if self.exclude is not None and _matches(self.exclude, key):
            return None
        name = key
        if self.strip_prefix and name.startswith(self.strip_prefix + "."):
            name = name[len(self.strip_prefix) + 1 :]
        if self.rename is not None:
            name = self.rename(name) if callable(self.rename) else self.rename.get(name, name)
            if not isinstance(name, str) or not name:
                raise MappingError(f"rename turned key {key!r} into {name!r}; expected a non-empty string")
        if self.add_prefix:
            name = f"{self.add_prefix}.{name}"
        return name

    def names(self, keys: Iterable[str]) -> dict[str, str]:
        """``{key: name}`` for every key the rules keep; :class:`MappingError` if two keys share a name."""
        out: dict[str, str] = {}
        owner: dict[str, str] = {}
        for key in keys:
            name = self.name_of(key)
            if name is None:
                continue
            other = owner.setdefault(name, key)
            if other != key:
                raise MappingError(f"keys {other!r} and {key!r} both map to {name!r}; adjust rename/strip_prefix")
            out[key] = name
        return out
