"""Key rules: which state-dict keys a checkpoint holds, and under which names.

Pure data and functions, no torch: a :class:`KeyMapping` maps state-dict keys
to checkpoint names, in this order: ``include``/``exclude`` (globs or a
predicate) on the original key, ``strip_prefix``, ``rename`` (a dict or a
callable), ``add_prefix``. The same forward mapping serves saving (keys are
written under their names) and loading (each target key is looked up under
its name), so a rule is written once. Two keys that map to one name are an
error naming both. A model prefix (``SafetensorsWriter(model_prefix=)``, the
reader's) is added, removed and checked by the prefix functions here only.

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
from dcp_safetensors.names import MODEL_GROUP, TRAINING_STATE_GROUP

__all__ = [
    "KeyMapping",
    "MappingError",
    "check_prefix",
    "with_prefix",
    "under_prefix",
    "without_prefix",
    "place_key",
]


class MappingError(ConfigurationError):
    """Key rules that cannot be applied: two keys map to one name, or a rule is malformed."""


def check_prefix(value: str | None, what: str, error: type[ConfigurationError] = ConfigurationError) -> None:
    """Raise ``error`` naming ``what`` unless ``value`` is None or a key prefix: not empty, no trailing dot.

    Example:
        >>> check_prefix("model", "model_prefix")
        >>> check_prefix("model.", "model_prefix")
        Traceback (most recent call last):
        ...
        dcp_safetensors.errors.ConfigurationError: model_prefix must be a key prefix without a trailing dot, got 'model.'
    """
    if value is not None and (not value or value.endswith(".")):
        raise error(f"{what} must be a key prefix without a trailing dot, got {value!r}")


def with_prefix(prefix: str | None, name: str) -> str:
    """``"<prefix>.<name>"``; ``name`` itself when there is no prefix (None or empty).

    Example:
        >>> with_prefix("model", "lm_head.weight"), with_prefix(None, "lm_head.weight")
        ('model.lm_head.weight', 'lm_head.weight')
    """
    return f"{prefix}.{name}" if prefix else name


def under_prefix(prefix: str | None, key: str) -> str | None:
    """``key`` without its leading ``"<prefix>."``, or None when ``key`` is not under ``prefix``;
    ``key`` itself when there is no prefix (None or empty).

    Example:
        >>> under_prefix("model", "model.embed.weight"), under_prefix("model", "model_ema.w"), under_prefix(None, "w")
        ('embed.weight', None, 'w')
    """
    if not prefix:
        return key
    return key[len(prefix) + 1 :] if key.startswith(prefix + ".") else None


def without_prefix(prefix: str | None, key: str) -> str:
    """``key`` without its leading ``"<prefix>."``; a key not under ``prefix`` as it is.

    Example:
        >>> without_prefix("model", "model.embed.weight"), without_prefix("model", "step")
        ('embed.weight', 'step')
    """
    name = under_prefix(prefix, key)
    return key if name is None else name


def place_key(key: str, model_prefix: str | None) -> tuple[str, str]:
    """``(file group, name in the file)`` of a state-dict key, as ``SafetensorsWriter(model_prefix=)`` places it.

    Without a model prefix every key is a weight under its own name; with one, the keys
    under it are weights without the prefix and every other key is training state.

    Example:
        >>> place_key("model.embed.weight", "model"), place_key("optim.step", "model")
        (('model', 'embed.weight'), ('training_state/state', 'optim.step'))
    """
    name = under_prefix(model_prefix, key)
    return (TRAINING_STATE_GROUP, key) if name is None else (MODEL_GROUP, name)


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
            check_prefix(getattr(self, name), name, MappingError)
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
        name = without_prefix(self.strip_prefix, key)
        if self.rename is not None:
            name = self.rename(name) if callable(self.rename) else self.rename.get(name, name)
            if not isinstance(name, str) or not name:
                raise MappingError(f"rename turned key {key!r} into {name!r}; expected a non-empty string")
        return with_prefix(self.add_prefix, name)

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
