"""The tied keys a transformers ``save_pretrained`` left out of its files, found for the reader.

:func:`infer_ties` reads the model's ``config.json`` and its class's
``_tied_weights_keys`` as ``from_pretrained`` does; our own saves record
every tied key in the index instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dcp_safetensors.errors import InvalidIndexError
from dcp_safetensors.index import read_json
from dcp_safetensors.mapping import under_prefix, with_prefix
from dcp_safetensors.names import CONFIG_FILE

if TYPE_CHECKING:
    from dcp_safetensors.checkpoint import Checkpoint, Files

__all__ = ["OUTPUT_EMBEDDING", "UnconfirmedTie", "infer_ties"]

OUTPUT_EMBEDDING = "lm_head.weight"
"""The output embedding of transformers' language models: the key ``save_pretrained`` leaves out when it is tied."""

_INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
"""The input embeddings transformers ties ``lm_head.weight`` to (``model.embed_tokens``, ``transformer.wte``,
``gpt_neox.embed_in``, ...); used for architectures the installed transformers does not know."""

_PARAMETER = re.compile(r"[\w.]+\.(?:weight|bias)")
"""A ``_tied_weights_keys`` entry naming one parameter, not a pattern over a module's parameters."""


@dataclass(frozen=True)
class UnconfirmedTie:
    """A key the checkpoint lacks that may be tied to ``twin`` (a stored key); ``reason`` says why the reader cannot tell."""

    twin: str
    reason: str


def infer_ties(ckpt: Checkpoint, storage: Files) -> None:
    """Add to ``ckpt`` the tied keys a transformers ``save_pretrained`` left out of its files.

    ``save_pretrained`` writes a tied pair once (no ``lm_head.weight`` when
    ``tie_word_embeddings`` is true) and records no alias. As ``from_pretrained``
    does, the model's ``config.json`` says whether it ties its embeddings, and
    its class's ``_tied_weights_keys`` (``{"lm_head.weight":
    "model.embed_tokens.weight"}``, ``{"lm_head.weight": "transformer.wte.weight"}``)
    which keys; for a class the installed transformers does not know (custom
    code) ``lm_head.weight`` pairs with the one input embedding among the keys.
    A tie confirmed so becomes an alias (in ``aliases`` and ``tensors``). One
    that only the key names suggest (no ``config.json``, or one that does not
    set ``tie_word_embeddings``) goes to ``unconfirmed``, so that reading it
    can fail with a message saying why. Our own checkpoints record every key
    they left out in the index, and are left as they are.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> from dcp_safetensors.checkpoint import read_checkpoint
        >>> from dcp_safetensors.storage import open_storage
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"model.embed_tokens.weight": torch.ones(4, 2)}, d + "/model.safetensors")
        >>> ckpt = read_checkpoint(d)
        >>> infer_ties(ckpt, open_storage(d))
        >>> ckpt.unconfirmed["lm_head.weight"].twin
        'model.embed_tokens.weight'
        >>> with open(d + "/config.json", "w") as f:
        ...     _ = f.write('{"architectures": ["MyCustomForCausalLM"], "tie_word_embeddings": true}')
        >>> ckpt = read_checkpoint(d)
        >>> infer_ties(ckpt, open_storage(d))
        >>> ckpt.aliases
        {'lm_head.weight': 'model.embed_tokens.weight'}
    """
    if ckpt.written_by_us or ckpt.chunked:
        return  # ours record their ties; torch's per-rank writer saved every key of the state dict it had
    names = {name for key in ckpt.tensors if (name := under_prefix(ckpt.model_prefix, key)) is not None}
    config, reason = _read_config(storage)
    tied = pairs = None
    if config is not None:
        tied = _ties_embeddings(config)
        if tied is False:
            return
        if tied:
            pairs = _model_ties(config)
        else:
            reason = f"{storage.path(CONFIG_FILE)} does not set tie_word_embeddings"
    if pairs is None:
        inputs = [n for n in names if _INPUT_EMBEDDING.search(n)]
        pairs = {OUTPUT_EMBEDDING: inputs[0]} if len(inputs) == 1 else {}
    for target, source in pairs.items():
        if (target in names) == (source in names):
            continue  # both saved (an untied save), or neither (not this checkpoint's keys)
        # from_pretrained ties either way round: whichever key of the pair was saved serves both.
        alias, kept = (target, source) if source in names else (source, target)
        alias, kept = with_prefix(ckpt.model_prefix, alias), with_prefix(ckpt.model_prefix, kept)
        if tied:
            ckpt.tensors[alias] = ckpt.tensors[kept]
            ckpt.aliases[alias] = kept
        else:
            ckpt.unconfirmed[alias] = UnconfirmedTie(kept, reason)


def _read_config(storage: Files) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint's ``config.json``, or None and why there is none to use."""
    if not storage.exists(CONFIG_FILE):
        return None, f"{storage.path(CONFIG_FILE)} does not exist"
    try:
        config = read_json(storage, CONFIG_FILE)
    except InvalidIndexError as e:
        return None, str(e)
    if not isinstance(config, dict):
        return None, f"{storage.path(CONFIG_FILE)} is not a JSON object"
    return config, ""


def _ties_embeddings(config: dict[str, Any]) -> bool | None:
    """``tie_word_embeddings`` as transformers reads it from ``config``; None if it cannot be told."""
    for scope in (config, config.get("text_config")):
        if isinstance(scope, dict) and isinstance(scope.get("tie_word_embeddings"), bool):
            return bool(scope["tie_word_embeddings"])
    # Configs saved before transformers 5 leave out a value equal to their class's default.
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    try:
        from transformers import AutoConfig

        value = getattr(AutoConfig.for_model(model_type), "tie_word_embeddings", None)
    except (ImportError, ValueError, KeyError):  # no transformers, or a model type it does not know
        return None
    return value if isinstance(value, bool) else None


def _model_ties(config: dict[str, Any]) -> dict[str, str] | None:
    """``{target: source}`` the model class of ``config`` ties (its ``_tied_weights_keys``).

    None when the installed transformers does not know the class (custom code),
    or names only the tied targets (transformers 4). Entries that are patterns
    over a module's parameters are left out: only the model's own parameter
    names expand them, and the checkpoint lacks the targets.
    """
    try:
        import transformers
    except ImportError:
        return None
    for arch in config.get("architectures") or ():
        try:
            cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        except (ImportError, RuntimeError):  # its modeling module needs a package that is not installed
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            continue
        mapping = cls._tied_weights_keys
        if mapping is None:
            return {}
        if isinstance(mapping, dict):
            return {t: s for t, s in mapping.items() if _PARAMETER.fullmatch(t) and _PARAMETER.fullmatch(s)}
        return None
    return None
