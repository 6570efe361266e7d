"""Planning at scale: DCP's coordinator steps for thousands of simulated ranks, ours vs torch's.

No processes: each rank's local save plan is built as DCP builds it (one
``WriteItem`` per DTensor shard, offsets and sizes as DTensor reports them)
from a real model inventory (transformers configs instantiated on the
``meta`` device, no download) under a placement (FSDP2, HSDP, TP x FSDP, and
expert parallelism for the MoE models). Then the coordinator's steps run
exactly as ``dcp.save`` runs them::

    plans = [writer.prepare_local_plan(planner_r.create_local_plan()) ...]   (each rank)
    plans, metadata = planner.create_global_plan(plans)                      (coordinator)
    plans = writer.prepare_global_plan(plans)                                (coordinator)

timed separately, with the pickled bytes DCP gathers to the coordinator and
scatters back (the largest plan one rank receives, too). "ours" is
``SafetensorsSavePlanner`` + ``SafetensorsWriter`` (a real local directory;
the staging directory is removed afterwards); "torch" is DCP's
``DefaultSavePlanner`` + ``FileSystemWriter`` on the same plans. A repeat save
with plan caching is timed too, and load planning (each rank's local plan
against the checkpoint's metadata, the coordinator's global step, the
metadata broadcast).

Usage::

    python benchmarks/plan_scale.py --model llama-70b --ranks 64 256 512 1024
    python benchmarks/plan_scale.py --all --out plan_scale.json --update-docs

Torch's planner is skipped where it would run longer than ``--torch-limit``
seconds (its time grows with the square of the ranks for some tensors).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_global_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcp_safetensors import SafetensorsSavePlanner, SafetensorsWriter  # noqa: E402
from dcp_safetensors.experts import TRANSFORMERS_EXPERTS, expert_shape  # noqa: E402
from dcp_safetensors.plan_cache import SaveCache

Tensor = tuple[str, tuple[int, ...], torch.dtype]
Chunk = tuple[str, tuple[int, ...], tuple[int, ...]]

# -- model inventories ---------------------------------------------------------------------

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama-70b": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
    "llama-405b": ("LlamaConfig", dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                       num_attention_heads=128, num_key_value_heads=8, vocab_size=128256)),
    "qwen3-moe-30b": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                             head_dim=128, num_experts=128, num_experts_per_tok=8,
                                             vocab_size=151936)),
    "deepseek-v3": ("DeepseekV3Config", dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                             num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256,
                                             n_shared_experts=1, num_attention_heads=128, num_key_value_heads=128,
                                             q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                                             qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280)),
}


def inventory(model: str) -> list[Tensor]:
    """``(key, shape, dtype)`` of every tensor of ``model``'s state dict, bf16, fused experts per expert.

    The model is built from its transformers config on the ``meta`` device
    (no memory, no download); transformers 5 keeps MoE experts fused, the
    checkpoint (and DCP's plans with ``hf_experts=True``) holds one key per
    expert, so fused expert tensors are listed as their per-expert keys.
    """
    import transformers

    config_cls, kwargs = MODELS[model]
    config = getattr(transformers, config_cls)(**kwargs)
    with torch.device("meta"):
        net = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out: list[Tensor] = []
    for key, value in net.state_dict().items():
        rule = next((r for r in TRANSFORMERS_EXPERTS if r.match(key) is not None), None)
        if rule is None:
            out.append((key, tuple(value.shape), value.dtype))
            continue
        prefix = rule.match(key)
        assert prefix is not None
        for e in range(value.shape[0]):
            for split in rule.splits:
                out.append((split.name.format(prefix=prefix, e=e), expert_shape(split, tuple(value.shape), key), value.dtype))
    return out


# -- placements ----------------------------------------------------------------------------


def _split(length: int, parts: int, index: int) -> tuple[int, int]:
    """``torch.chunk``'s piece ``index`` of ``length`` in ``parts`` (what FSDP2 and DTensor use)."""
    step = -(-length // parts)
    lo = min(index * step, length)
    return lo, min(lo + step, length) - lo


def _shard(shape: tuple[int, ...], cuts: list[tuple[int, int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box of ``shape`` after sharding, outer to inner, each ``(dim, parts, index)``.

    Two cuts on one dim nest (the inner cut splits the outer's piece), as
    FSDP2 over TP on the same dim (``_StridedShard``) reports it.
    """
    offsets, sizes = [0] * len(shape), list(shape)
    for dim, parts, index in cuts:
        lo, n = _split(sizes[dim], parts, index)
        offsets[dim] += lo
        sizes[dim] = n
    return tuple(offsets), tuple(sizes)


_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "q_a_proj", "q_b_proj",
            "kv_a_proj_with_mqa", "kv_b_proj", "embed_tokens")
_ROWWISE = ("o_proj", "down_proj")


def _tp_dim(key: str, shape: tuple[int, ...]) -> int | None:
    """Megatron-style TP: colwise linears on dim 0, rowwise on dim 1, the rest (norms, router) replicated."""
    if len(shape) != 2 or ".experts." in key:
        return None
    name = key.rsplit(".", 2)[-2]
    if name in _COLWISE:
        return 0
    if name in _ROWWISE:
        return 1
    return None


def _expert(key: str) -> int | None:
    parts = key.split(".experts.")
    if len(parts) != 2:
        return None
    head = parts[1].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def placement_chunks(tensors: list[Tensor], scheme: str, world: int, tp: int = 8, replicas: int = 8,
                     ep: int = 64) -> Iterator[list[Chunk]]:
    """Each rank's chunks (``(key, offsets, sizes)``), rank by rank.

    * ``fsdp``: every tensor ``Shard(0)`` over all ranks (FSDP2).
    * ``hsdp``: ``replicas`` x ``world / replicas`` mesh, ``Shard(0)`` within
      a replica, replicated across (DCP's dedup keeps one copy).
    * ``tp-fsdp``: ``world / tp`` x ``tp`` mesh: colwise linears ``Shard(0)``
      on tp, rowwise ``Shard(1)``, FSDP ``Shard(0)`` on dp over that.
    Per-expert tensors (MoE) are placed by expert parallelism over ``ep``
    groups of ``world / ep`` ranks: an expert lives in one group, FSDP-sharded
    within it.
    """
    if scheme == "hsdp" and world % replicas:
        raise ValueError(f"hsdp: {world} ranks do not split into {replicas} replicas")
    if scheme == "tp-fsdp" and world % tp:
        raise ValueError(f"tp-fsdp: {world} ranks do not split into tp={tp}")
    ep = min(ep, world)
    for rank in range(world):
        chunks = []
        for key, shape, _ in tensors:
            expert = _expert(key)
            if expert is not None and world % ep == 0:
                group_size = world // ep
                if expert % ep != rank // group_size:
                    continue  # another EP group's expert
                cuts = [(0, group_size, rank % group_size)]
            elif scheme == "fsdp":
                cuts = [(0, world, rank)]
            elif scheme == "hsdp":
                shards = world // replicas
                cuts = [(0, shards, rank % shards)]
            else:
                dp, tp_rank = world // tp, rank % tp
                dim = _tp_dim(key, shape)
                tp_cut = [] if dim is None else [(dim, tp, tp_rank)]
                cuts = tp_cut + [(0, dp, rank // tp)]
            if not shape:
                cuts = []
                if rank:
                    continue
            offsets, sizes = _shard(shape, cuts)
            chunks.append((key, offsets, sizes))
        yield chunks


def local_plan(chunks: list[Chunk], dtypes: dict[str, torch.dtype], shapes: dict[str, tuple[int, ...]]) -> SavePlan:
    """The ``SavePlan`` DCP's ``create_default_local_save_plan`` makes for a rank holding ``chunks``."""
    items = []
    for key, offsets, sizes in chunks:
        items.append(
            WriteItem(
                index=MetadataIndex(key, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=dtypes[key]),
                    size=torch.Size(shapes[key]),
                ),
            )
        )
    # DCP's planner sends its flatten mapping (every key of the rank's state dict) along.
    return SavePlan(items, planner_data={key: (key,) for key, _, _ in chunks})


# -- measurement ---------------------------------------------------------------------------


@dataclass
class SaveRun:
    method: str
    model: str
    scheme: str
    ranks: int
    chunks: int
    global_plan_s: float
    storage_plan_s: float
    gathered_bytes: int
    scattered_bytes: int
    largest_scattered: int
    repeat_s: float | None = None
    repeat_scattered_bytes: int | None = None

    @property
    def total_s(self) -> float:
        return self.global_plan_s + self.storage_plan_s


def _pickled(obj: Any) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _clear_plan_cache() -> None:
    """DCP's class-level plan caches (torch's planner keeps them across instances)."""
    for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_all_plans, SavePlanner._cached_global_plan,
                  SavePlanner._cached_metadata, SavePlanner._cached_final_save_plan):
        cache.clear()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    gc.collect()
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def run_save(method: str, model: str, scheme: str, world: int, tensors: list[Tensor], directory: str,
             repeat: bool) -> SaveRun:
    """Time the coordinator's two planning steps (and a cached repeat) for ``world`` simulated ranks.

    A repeat save runs as ranks run it: ours with the same planner on the
    coordinator and each simulated rank's own :class:`SaveCache` (rank 0's is
    the planner's), every rank confirming its final plan; torch's with DCP's
    class-level caches.
    """
    _clear_plan_cache()
    dtypes = {k: d for k, _, d in tensors}
    shapes = {k: s for k, s, _ in tensors}
    raw = [local_plan(c, dtypes, shapes) for c in placement_chunks(tensors, scheme, world)]
    if method == "ours":
        planner: Any = SafetensorsSavePlanner(enable_plan_caching=repeat)
        writer: Any = SafetensorsWriter(directory)
        caches = [planner.cache, *(SaveCache() for _ in range(world - 1))] if repeat else []

        def send() -> list[SavePlan]:
            offered = [c.offer(p, planner.options()) for c, p in zip(caches, raw, strict=True)] if caches else raw
            return [writer.prepare_local_plan(p) for p in offered]

        def confirm(final: list[SavePlan]) -> None:
            for c, p in zip(caches, final, strict=True):
                c.confirm(p)
    else:
        planner = DefaultSavePlanner(enable_plan_caching=repeat)
        writer = FileSystemWriter(directory)

        def send() -> list[SavePlan]:
            return [writer.prepare_local_plan(p) for p in raw]

        def confirm(final: list[SavePlan]) -> None:
            for p in final:
                planner.finish_plan(p)
    writer.set_up_storage_writer(True)
    plans = send()
    chunks = sum(len(p.items) for p in plans)
    gathered = sum(_pickled(p) for p in plans)
    (plans_out, _), global_s = _timed(lambda: planner.create_global_plan(plans))
    final, storage_s = _timed(lambda: writer.prepare_global_plan(plans_out))
    sizes = [_pickled(p) for p in final]
    run = SaveRun(method, model, scheme, world, chunks, global_s, storage_s, gathered, sum(sizes), max(sizes))
    _abort(writer)
    if repeat:
        confirm(final)
        unchanged = send() if method == "ours" else [writer.prepare_local_plan(SavePlan([], usable=False))] * world

        def again() -> list[SavePlan]:
            out, _ = planner.create_global_plan(unchanged)
            return writer.prepare_global_plan(out)

        final2, run.repeat_s = _timed(again)
        run.repeat_scattered_bytes = sum(_pickled(p) for p in final2)
        _abort(writer)
    _clear_plan_cache()
    return run


def _abort(writer: Any) -> None:
    """Drop our writer's staged save (torch's writers stage nothing)."""
    if isinstance(writer, SafetensorsWriter) and writer._save is not None:
        writer._save.abort()


@dataclass
class LoadRun:
    model: str
    scheme: str
    ranks: int
    metadata_bytes: int
    local_plan_s: float
    global_plan_s: float
    gathered_bytes: int


def run_load(model: str, scheme: str, world: int, tensors: list[Tensor]) -> LoadRun:
    """Load planning against an HF checkpoint's metadata (one chunk per tensor) for ``world`` ranks.

    ``local_plan_s`` is the slowest rank's local step (every rank runs its own
    in parallel); the global step runs on the coordinator over all plans.
    """
    md = Metadata(
        state_dict_metadata={
            k: TensorStorageMetadata(TensorProperties(dtype=d), torch.Size(s),
                                     [ChunkStorageMetadata(torch.Size([0] * len(s)), torch.Size(s))])
            for k, s, d in tensors
        }
    )
    plans = []
    slowest = 0.0
    gc.collect()
    gc.disable()  # a collection of the simulation's own millions of objects is no rank's cost
    try:
        for chunks in placement_chunks(tensors, scheme, world):
            started = time.perf_counter()
            items = []
            for key, offsets, sizes in chunks:
                items += create_read_items_for_chunk_list(
                    key, md.state_dict_metadata[key], [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))]
                )
            plans.append(LoadPlan(items))
            slowest = max(slowest, time.perf_counter() - started)
    finally:
        gc.enable()
    gathered = sum(_pickled(p) for p in plans)
    _, global_s = _timed(lambda: create_default_global_load_plan(plans))
    return LoadRun(model, scheme, world, _pickled(md), slowest, global_s, gathered)


# -- report --------------------------------------------------------------------------------


def report(paths: list[str], root: Path) -> str:
    """Markdown tables of one or more result files, written into docs/benchmarks.md with a plot."""
    runs: list[dict[str, Any]] = []
    machine = ""
    for path in paths:
        doc = json.loads(Path(path).read_text())
        machine = doc["machine"]
        runs += doc["results"]
    saves = [r for r in runs if r["kind"] == "save"]
    loads = {(r["model"], r["scheme"], r["ranks"]): r for r in runs if r["kind"] == "load"}
    by = {(r["method"], r["model"], r["scheme"], r["ranks"]): r for r in saves}
    lines = [f"Machine: {machine}; one process, the coordinator's steps timed as `dcp.save` runs them.", ""]
    lines += ["| model | placement | ranks | chunks | torch planner | ours | ours vs torch | repeat (cached) | "
              "gathered | largest plan back (ours / torch) | load: local + global plan |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (method, model, scheme, world), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        if method != "ours":
            continue
        t = by.get(("torch", model, scheme, world))
        ld = loads.get((model, scheme, world))
        torch_s = f"{t['total_s']:.2f} s" if t else "skipped"
        ratio = f"{t['total_s'] / r['total_s']:.1f}x" if t else ""
        torch_plan = f"{t['largest_scattered'] / 2**10:.0f}" if t else "-"
        load = f"{ld['local_plan_s']:.3f} + {ld['global_plan_s']:.3f} s" if ld else ""
        lines.append(
            f"| {model} | {scheme} | {world} | {r['chunks']:,} | {torch_s} | {r['total_s']:.2f} s | {ratio} | "
            f"{r['repeat_s']:.3f} s | {r['gathered_bytes'] / 2**20:.1f} MiB | "
            f"{r['largest_scattered'] / 2**10:.0f} / {torch_plan} KiB | {load} |"
        )
    _plot(saves, root / "docs" / "img" / "plan_scale.png")
    return "\n".join(lines) + "\n\n![planning time against ranks, ours vs torch's default planner](img/plan_scale.png)\n"


def _plot(saves: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, style in (("torch", "o--"), ("ours", "s-")):
        for scheme in sorted({r["scheme"] for r in saves if r["model"] == "llama-70b"}):
            points = sorted((r["ranks"], r["total_s"]) for r in saves
                            if r["method"] == method and r["model"] == "llama-70b" and r["scheme"] == scheme)
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{method} ({scheme})")
    points = sorted((r["ranks"], r["repeat_s"]) for r in saves
                    if r["method"] == "ours" and r["model"] == "llama-70b" and r["scheme"] == "fsdp")
    if points:
        ax.plot(*zip(*points, strict=True), "^:", label="ours, repeat save (plan cached)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("coordinator planning time (s)")
    ax.set_title("Llama-3-70B (723 bf16 tensors): global save planning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["llama-70b"], choices=sorted(MODELS))
    parser.add_argument("--scheme", nargs="+", default=["fsdp"], choices=["fsdp", "hsdp", "tp-fsdp"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[64, 256, 512, 1024])
    parser.add_argument("--torch-limit", type=float, default=200.0,
                        help="skip torch's planner where its previous size took longer than this / 4 seconds")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-load", action="store_true")
    parser.add_argument("--out", default="plan_scale.json")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="write the tables and plot of these result files into docs/benchmarks.md, run nothing")
    args = parser.parse_args(argv)
    if args.report:
        from report import replace_marked

        root = Path(__file__).resolve().parents[1]
        text = report(args.report, root)
        print(text)
        replace_marked(str(root / "docs" / "benchmarks.md"), text, "plan-scale")
        return 0
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        for model in args.model:
            tensors = inventory(model)
            print(f"{model}: {len(tensors)} tensors, {sum(math.prod(s) * d.itemsize for _, s, d in tensors) / 1e9:.1f} GB",
                  flush=True)
            for scheme in args.scheme:
                torch_last = 0.0
                for world in args.ranks:
                    methods = ["ours"]
                    if not args.no_torch and torch_last * 4 < args.torch_limit:
                        methods.append("torch")
                    for method in methods:
                        run = run_save(method, model, scheme, world, tensors, directory, repeat=True)
                        if method == "torch":
                            torch_last = run.total_s
                        results.append({"kind": "save", **dataclasses.asdict(run), "total_s": run.total_s})
                        print(f"  save {method:5s} {scheme:7s} {world:5d} ranks {run.chunks:8d} chunks: "
                              f"global {run.global_plan_s:7.2f} s + storage {run.storage_plan_s:6.2f} s = "
                              f"{run.total_s:7.2f} s; repeat {run.repeat_s:6.3f} s; gathered "
                              f"{run.gathered_bytes / 2**20:7.1f} MiB, scattered {run.scattered_bytes / 2**20:7.1f} MiB "
                              f"(largest {run.largest_scattered / 2**10:7.1f} KiB)", flush=True)
                    if not args.no_load:
                        load = run_load(model, scheme, world, tensors)
                        results.append({"kind": "load", **dataclasses.asdict(load)})
                        print(f"  load       {scheme:7s} {world:5d} ranks: local {load.local_plan_s:.3f} s, global "
                              f"{load.global_plan_s:.3f} s, metadata {load.metadata_bytes / 2**10:.0f} KiB, gathered "
                              f"{load.gathered_bytes / 2**20:.1f} MiB", flush=True)
    Path(args.out).write_text(json.dumps({"machine": _machine(), "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


def _machine() -> str:
    return f"{os.cpu_count()} CPUs, torch {torch.__version__}, {sys.platform}"


if __name__ == "__main__":
    raise SystemExit(main())
