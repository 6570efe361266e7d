"""Fused MoE expert rules: fused ``[E, ...]`` parameters <-> per-expert checkpoint keys.

transformers 5 keeps a MoE layer's experts as fused parameters
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj``
``[E, H, I]``) while the checkpoints on the Hub, and what ``save_pretrained``
writes, hold one key per expert (``mlp.experts.{e}.gate_proj.weight``
``[I, H]``, ...). A :class:`FusedExperts` rule states the relation as data:
the fused key pattern, and for each per-expert key which part of one
expert's slice it is (split along a dim into equal blocks, or interleaved)
and whether it is stored transposed, and what its dims are called, so a
fused tensor of another layout is refused instead of cut on the wrong axis
(:func:`layout_conflict`); a rule may also move the rest of its MoE block
(Mixtral's router) to the name checkpoints use (:func:`block_renames`).
:func:`expert_pieces` maps any box of a fused tensor (one rank's shard,
whatever its placement) to the boxes of the per-expert tensors it holds,
with the slice of the shard that holds each; the planners turn those into
DCP write and read items, so every rank writes and reads only the experts
(or expert slices) it holds.

Pure Python, no torch: tested exhaustively against numpy.

Example:
    >>> rule = TRANSFORMERS_EXPERTS[0]
    >>> rule.match("model.layers.3.mlp.experts.gate_up_proj")
    'model.layers.3.mlp'
    >>> # rank holding experts 2..3 of a [4, 2*6, 8] gate_up_proj, all of them
    >>> for p in expert_pieces(rule, "m", (4, 12, 8), (2, 0, 0), (2, 12, 8)):
    ...     print(p.name, p.offsets, p.sizes)
    m.experts.2.gate_proj.weight (0, 0) (6, 8)
    m.experts.2.up_proj.weight (0, 0) (6, 8)
    m.experts.3.gate_proj.weight (0, 0) (6, 8)
    m.experts.3.up_proj.weight (0, 0) (6, 8)
"""

from __future__ import annotations

import re
import string
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dcp_safetensors.mapping import MappingError

__all__ = [
    "ExpertSplit",
    "FusedExperts",
    "ExpertPiece",
    "expert_pieces",
    "expert_shape",
    "layout_conflict",
    "block_renames",
    "per_expert_hint",
    "TRANSFORMERS_EXPERTS",
    "MIXTRAL_EXPERTS",
    "resolve_rules",
]


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclass(frozen=True)
class ExpertSplit:
    """One per-expert key cut from every expert's slice ``fused[e]`` of a fused tensor.

    Args:
        name: the per-expert key, a template with ``{prefix}`` (what the fused
            pattern's ``{prefix}`` matched) and ``{e}`` (the global expert index).
        dim: the dim of ``fused[e]`` (the expert dim removed) that is split.
        parts: ``fused[e]`` is split into this many equal blocks along ``dim``.
        part: the block this key holds (0-based).
        interleaved: the blocks interleave (``part``, ``part + parts``, ...)
            instead of being contiguous (``[part * n : (part + 1) * n]``).
        transpose: the key holds the slice with its last two dims swapped.
        dims: names of the per-expert tensor's dims as stored (e.g.
            ``("intermediate", "hidden")`` for an ``nn.Linear`` weight). Within
            one MoE block a name must have one size in every per-expert tensor
            of the rules, so a fused tensor laid out otherwise (gpt-oss's
            ``[E, H, 2I]`` under a rule for ``[E, 2I, H]``) is refused, not cut
            on the wrong axis. Empty: not checked.

    Example:
        >>> ExpertSplit("{prefix}.{e}.w1.weight", parts=2, part=0).name.format(prefix="m", e=3)
        'm.3.w1.weight'
    """

    name: str
    dim: int = 0
    parts: int = 1
    part: int = 0
    interleaved: bool = False
    transpose: bool = False
    dims: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if _fields(self.name) - {"prefix", "e"} or "e" not in _fields(self.name):
            raise MappingError(f"per-expert key template {self.name!r} must use {{e}} and may use only {{prefix}} besides")
        if self.parts < 1 or not 0 <= self.part < self.parts or self.dim < 0:
            raise MappingError(f"{self.name!r}: need 0 <= part < parts and dim >= 0, got part={self.part} parts={self.parts} dim={self.dim}")
        if isinstance(self.dims, str) or not all(isinstance(d, str) and d for d in self.dims):
            raise MappingError(f"{self.name!r}: dims must be a tuple of dim names, got {self.dims!r}")


@dataclass(frozen=True)
class FusedExperts:
    """A fused expert parameter ``[E, ...]`` (expert dim first) and the per-expert keys it holds.

    ``rename_block=(block, name)``: the other keys under ``block`` (both
    templates with ``{prefix}``, filled with what this rule matched) are
    stored under ``name``, as transformers writes Mixtral's ``mlp`` block as
    ``block_sparse_moe``, router included (see :func:`block_renames`).

    Example:
        >>> rule = FusedExperts("{prefix}.experts.down_proj", (ExpertSplit("{prefix}.experts.{e}.down_proj.weight"),))
        >>> rule.match("layers.0.mlp.experts.down_proj"), rule.match("layers.0.mlp.experts.down_proj_bias")
        ('layers.0.mlp', None)
        >>> rule.names("m", 2)
        ['m.experts.0.down_proj.weight', 'm.experts.1.down_proj.weight']
    """

    fused: str
    splits: tuple[ExpertSplit, ...]
    rename_block: tuple[str, str] | None = None
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if _fields(self.fused) - {"prefix"}:
            raise MappingError(f"fused key pattern {self.fused!r} may use only {{prefix}}")
        if not self.splits:
            raise MappingError(f"fused key pattern {self.fused!r} has no per-expert keys")
        if self.rename_block is not None:
            if len(self.rename_block) != 2 or any(_fields(t) - {"prefix"} for t in self.rename_block):
                raise MappingError(f"rename_block must be (block, name) templates using only {{prefix}}, got {self.rename_block!r}")
        regex = "".join(
            re.escape(literal) + ("(?P<prefix>.+)" if name == "prefix" else "")
            for literal, name, _, _ in string.Formatter().parse(self.fused)
        )
        object.__setattr__(self, "_pattern", re.compile(regex))

    def match(self, key: str) -> str | None:
        """The ``{prefix}`` of ``key`` if it is this rule's fused key (``""`` without a prefix), else None."""
        m = self._pattern.fullmatch(key)
        if m is None:
            return None
        return m.groupdict().get("prefix") or ""

    def names(self, prefix: str, experts: int) -> list[str]:
        """Every per-expert key of a fused tensor with ``experts`` experts, expert-major."""
        return [s.name.format(prefix=prefix, e=e) for e in range(experts) for s in self.splits]


_LINEAR_IN = ("intermediate", "hidden")  # gate_proj / up_proj as nn.Linear weights: [I, H]
_LINEAR_OUT = ("hidden", "intermediate")  # down_proj: [H, I]
# transformers keeps Mixtral's MoE block as `mlp` and writes it as `block_sparse_moe`, router included.
_MIXTRAL_BLOCK = ("{prefix}.mlp", "{prefix}.block_sparse_moe")

TRANSFORMERS_EXPERTS: tuple[FusedExperts, ...] = (
    FusedExperts(
        "{prefix}.experts.gate_up_proj",
        (
            ExpertSplit("{prefix}.experts.{e}.gate_proj.weight", parts=2, part=0, dims=_LINEAR_IN),
            ExpertSplit("{prefix}.experts.{e}.up_proj.weight", parts=2, part=1, dims=_LINEAR_IN),
        ),
    ),
    FusedExperts("{prefix}.experts.down_proj", (ExpertSplit("{prefix}.experts.{e}.down_proj.weight", dims=_LINEAR_OUT),)),
)
"""transformers 5's fused experts as its ``save_pretrained`` writes them (Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GLM-4-MoE, ...).

Tested key by key and byte by byte against ``save_pretrained`` of each named
architecture. Not for gpt-oss, whose ``save_pretrained`` writes the fused
``[E, H, 2I]`` tensors as they are: the planners refuse the layout.
"""

MIXTRAL_EXPERTS: tuple[FusedExperts, ...] = (
    FusedExperts(
        "{prefix}.mlp.experts.gate_up_proj",
        (
            ExpertSplit("{prefix}.block_sparse_moe.experts.{e}.w1.weight", parts=2, part=0, dims=_LINEAR_IN),
            ExpertSplit("{prefix}.block_sparse_moe.experts.{e}.w3.weight", parts=2, part=1, dims=_LINEAR_IN),
        ),
        rename_block=_MIXTRAL_BLOCK,
    ),
    FusedExperts(
        "{prefix}.mlp.experts.down_proj",
        (ExpertSplit("{prefix}.block_sparse_moe.experts.{e}.w2.weight", dims=_LINEAR_OUT),),
        rename_block=_MIXTRAL_BLOCK,
    ),
)
"""Mixtral (and MiniMax) checkpoints: ``block_sparse_moe.experts.{e}.w1/w3/w2``, the router as ``block_sparse_moe.gate.weight``."""

_SHIPPED = (("hf_experts=True", TRANSFORMERS_EXPERTS), ("hf_experts=dcp_safetensors.experts.MIXTRAL_EXPERTS", MIXTRAL_EXPERTS))


def resolve_rules(hf_experts: bool | Sequence[FusedExperts]) -> tuple[FusedExperts, ...]:
    """The rules a planner's ``hf_experts`` argument names: ``True`` is :data:`TRANSFORMERS_EXPERTS`.

    Example:
        >>> resolve_rules(False), len(resolve_rules(True)), resolve_rules(MIXTRAL_EXPERTS) == MIXTRAL_EXPERTS
        ((), 2, True)
    """
    if hf_experts is True:
        return TRANSFORMERS_EXPERTS
    if hf_experts is False:
        return ()
    rules = tuple(hf_experts)
    if not all(isinstance(r, FusedExperts) for r in rules):
        raise MappingError(f"hf_experts must be True, False or a sequence of FusedExperts rules, got {hf_experts!r}")
    return rules


def block_renames(fused: Mapping[str, tuple[FusedExperts, str]], keys: Iterable[str]) -> dict[str, str]:
    """``{key: checkpoint name}`` for each of ``keys`` that the ``rename_block`` of a matched rule moves.

    ``fused`` is ``{fused key: (rule, prefix)}``, the keys the rules matched:
    only their blocks move, and the fused keys themselves are named by their
    rules' per-expert keys, not moved.

    Example:
        >>> keys = ["l.0.mlp.gate.weight", "l.0.mlp.experts.down_proj", "l.0.norm.weight", "l.1.mlp.gate.weight"]
        >>> block_renames({"l.0.mlp.experts.down_proj": (MIXTRAL_EXPERTS[1], "l.0")}, keys)
        {'l.0.mlp.gate.weight': 'l.0.block_sparse_moe.gate.weight'}
    """
    heads = {
        rule.rename_block[0].format(prefix=prefix): rule.rename_block[1].format(prefix=prefix)
        for rule, prefix in fused.values()
        if rule.rename_block is not None
    }
    out: dict[str, str] = {}
    if not heads:
        return out
    for key in keys:
        if key in fused:
            continue
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):  # the innermost block first
            moved = heads.get(".".join(parts[:n]))
            if moved is not None:
                out[key] = ".".join([moved, *parts[n:]])
                break
    return out


def layout_conflict(fused: Iterable[tuple[str, FusedExperts, str, Sequence[int]]]) -> str | None:
    """Why fused tensors ``(key, rule, prefix, shape)`` cannot have the layout their rules describe, or None.

    Each :attr:`ExpertSplit.dims` name must have one size in all per-expert
    tensors of one block (one prefix); a fused dim that does not split as the
    rule says is a conflict too.

    Example:
        >>> gate_up, down = TRANSFORMERS_EXPERTS
        >>> ok = [("m.experts.gate_up_proj", gate_up, "m", (4, 12, 8)), ("m.experts.down_proj", down, "m", (4, 8, 6))]
        >>> layout_conflict(ok) is None
        True
        >>> # gpt-oss keeps gate_up_proj as [E, H, 2I] and down_proj as [E, I, H]
        >>> gpt_oss = [("m.experts.gate_up_proj", gate_up, "m", (4, 8, 12)), ("m.experts.down_proj", down, "m", (4, 6, 8))]
        >>> print(layout_conflict(gpt_oss))
        'hidden' is 12 in 'm.experts.{e}.gate_proj.weight' (of 'm.experts.gate_up_proj' [4, 8, 12]) but 6 in 'm.experts.{e}.down_proj.weight' (of 'm.experts.down_proj' [4, 6, 8])
    """
    seen: dict[tuple[str, str], tuple[int, str, str, list[int]]] = {}
    for key, rule, prefix, shape in fused:
        for split in rule.splits:
            if not split.dims:
                continue
            try:
                sizes = expert_shape(split, shape, key)
            except MappingError as e:
                return str(e)
            if len(split.dims) != len(sizes):
                raise MappingError(f"{split.name!r}: {len(split.dims)} dim names {split.dims} for a {len(sizes)}-dim per-expert tensor")
            name = split.name.format(prefix=prefix, e="{e}")
            for dim, size in zip(split.dims, sizes):
                first = seen.setdefault((prefix, dim), (size, name, key, list(shape)))
                if first[0] != size:
                    return (
                        f"{dim!r} is {first[0]} in {first[1]!r} (of {first[2]!r} {first[3]}) "
                        f"but {size} in {name!r} (of {key!r} {list(shape)})"
                    )
    return None


def per_expert_hint(key: str, present: Container[str]) -> tuple[str, str] | None:
    """``(planner argument, a per-expert key)`` if ``present`` holds fused ``key`` per expert under a shipped rule set.

    Example:
        >>> per_expert_hint("l.0.mlp.experts.down_proj", {"l.0.mlp.experts.0.down_proj.weight"})
        ('hf_experts=True', 'l.0.mlp.experts.0.down_proj.weight')
        >>> per_expert_hint("l.0.mlp.experts.down_proj", {"l.0.mlp.experts.down_proj.weight"}) is None
        True
    """
    for argument, rules in _SHIPPED:
        for rule in rules:
            prefix = rule.match(key)
            if prefix is not None and (example := rule.splits[0].name.format(prefix=prefix, e=0)) in present:
                return argument, example
    return None


def expert_shape(split: ExpertSplit, fused_shape: Sequence[int], key: str = "") -> tuple[int, ...]:
    """Shape of one per-expert tensor of ``split`` cut from a fused tensor of ``fused_shape``.

    Example:
        >>> expert_shape(TRANSFORMERS_EXPERTS[0].splits[1], (8, 12, 4))
        (6, 4)
        >>> expert_shape(ExpertSplit("{e}.w", dim=1, parts=2, interleaved=True, transpose=True), (8, 4, 12))
        (6, 4)
    """
    slice_shape = list(fused_shape[1:])
    where = f" for {key!r}" if key else ""
    if len(fused_shape) < 1 or split.dim >= max(len(slice_shape), 1) or (not slice_shape and split.parts > 1):
        raise MappingError(f"{split.name!r}: cannot split dim {split.dim} of a fused {list(fused_shape)} tensor{where}")
    if slice_shape:
        if slice_shape[split.dim] % split.parts:
            raise MappingError(
                f"{split.name!r}: dim {split.dim + 1} of the fused {list(fused_shape)} tensor{where} "
                f"does not split into {split.parts} equal parts"
            )
        slice_shape[split.dim] //= split.parts
    if split.transpose:
        if len(slice_shape) < 2:
            raise MappingError(f"{split.name!r}: cannot transpose a {len(slice_shape)}-dim expert slice{where}")
        slice_shape[-2], slice_shape[-1] = slice_shape[-1], slice_shape[-2]
    return tuple(slice_shape)


@dataclass(frozen=True)
class ExpertPiece:
    """The part of one per-expert tensor that one box of a fused tensor holds.

    ``offsets``/``sizes`` place it in the per-expert tensor of ``shape``;
    ``index`` selects it from the box's data (an int for the expert, then one
    slice per dim), and ``transpose`` says to swap the selection's last two
    dims after.
    """

    name: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    index: tuple[int | slice, ...]
    transpose: bool


def _cut(split: ExpertSplit, length: int, lo: int, hi: int) -> tuple[int, int, slice]:
    """(first index in the per-expert tensor, count, slice of the box) of fused range ``[lo, hi)`` along the split dim."""
    block = length // split.parts
    if split.interleaved:
        # fused index i = j * parts + part
        first = max(0, -(-(lo - split.part) // split.parts))
        stop = min(block, -(-(hi - split.part) // split.parts))
        count = max(0, stop - first)
        start = first * split.parts + split.part - lo
        return first, count, slice(start, start + (count - 1) * split.parts + 1 if count else start, split.parts)
    base = split.part * block
    a, c = max(lo, base), min(hi, base + block)
    count = max(0, c - a)
    return (a - base if count else 0), count, slice(a - lo, a - lo + count, 1)


def expert_pieces(
    rule: FusedExperts, prefix: str, fused_shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int]
) -> list[ExpertPiece]:
    """The per-expert pieces held by the box ``offsets``/``sizes`` of a fused tensor of ``fused_shape``.

    Pieces with no bytes are left out, except for per-expert tensors that are
    empty themselves (so they are still declared). Boxes that tile the fused
    tensor give pieces that tile every per-expert tensor exactly.

    Example:
        >>> # experts 0..1 of a [2, 4, 2] down_proj, rows 1..2 only (a Shard(1) shard)
        >>> pieces = expert_pieces(TRANSFORMERS_EXPERTS[1], "m", (2, 4, 2), (0, 1, 0), (2, 2, 2))
        >>> [(p.name, p.offsets, p.sizes) for p in pieces]
        [('m.experts.0.down_proj.weight', (1, 0), (2, 2)), ('m.experts.1.down_proj.weight', (1, 0), (2, 2))]
        >>> pieces[1].index  # expert 1 of the box, all of its rows and columns
        (1, slice(0, 2, 1), slice(0, 2, 1))
    """
    if not (len(fused_shape) == len(offsets) == len(sizes)) or not fused_shape:
        raise MappingError(f"{rule.fused!r}: box {list(offsets)}+{list(sizes)} does not fit a fused {list(fused_shape)} tensor")
    # Per split: where the box's part of it sits in every per-expert tensor, and which slice of the box holds it.
    placed = []
    for split in rule.splits:
        shape = expert_shape(split, fused_shape)
        cuts = []
        for dim in range(len(fused_shape) - 1):
            lo, n = offsets[dim + 1], sizes[dim + 1]
            if dim == split.dim:
                cuts.append(_cut(split, fused_shape[dim + 1], lo, lo + n))
            else:
                cuts.append((lo, n, slice(0, n, 1)))
        if any(n == 0 for n in shape):  # an empty tensor: declared whole, nothing to read or write
            cuts = [(0, 0, slice(0, 0, 1)) for _ in cuts]
            piece_offsets, piece_sizes = [0] * len(shape), list(shape)
        elif any(count == 0 for _, count, _ in cuts):
            continue
        else:
            piece_offsets = [first for first, _, _ in cuts]
            piece_sizes = [count for _, count, _ in cuts]
            if split.transpose:
                for seq in (piece_offsets, piece_sizes):
                    seq[-2], seq[-1] = seq[-1], seq[-2]
        placed.append((split, shape, tuple(piece_offsets), tuple(piece_sizes), tuple(sel for _, _, sel in cuts)))
    return [
        ExpertPiece(split.name.format(prefix=prefix, e=e), shape, at, size, (e - offsets[0], *sel), split.transpose)
        for e in range(offsets[0], offsets[0] + sizes[0])  # expert-major, as the keys are numbered
        for split, shape, at, size, sel in placed
    ]
