"""Planning at scale: the global step against torch's on simulated ranks, plan caching, multi-node torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scale_cases
import torch
from helpers import free_port
from torch.distributed.checkpoint.planner import SavePlan

from dcp_safetensors import SafetensorsSavePlanner, SafetensorsWriter
from dcp_safetensors.errors import LayoutError
from dcp_safetensors.global_plan import collect_chunks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plan_scale  # noqa: E402

SMALL = [  # a Llama-like inventory: (key, shape, dtype)
    ("model.embed_tokens.weight", (1000, 64), torch.bfloat16),
    *[(f"model.layers.{i}.self_attn.{n}.weight", (64, 64), torch.bfloat16) for i in range(3) for n in ("q_proj", "o_proj")],
    *[(f"model.layers.{i}.mlp.down_proj.weight", (64, 256), torch.bfloat16) for i in range(3)],
    *[(f"model.layers.{i}.input_layernorm.weight", (64,), torch.float32) for i in range(3)],
    ("lm_head.weight", (1000, 64), torch.bfloat16),
]


def _plans(scheme: str, world: int, writer: SafetensorsWriter) -> list[SavePlan]:
    dtypes = {k: d for k, _, d in SMALL}
    shapes = {k: s for k, s, _ in SMALL}
    return [
        writer.prepare_local_plan(plan_scale.local_plan(c, dtypes, shapes))
        for c in plan_scale.placement_chunks(SMALL, scheme, world, tp=4, replicas=4)
    ]


@pytest.mark.parametrize("scheme", ["fsdp", "hsdp", "tp-fsdp"])
def test_global_step_matches_torch_and_plans_stay_per_rank(tmp_path, scheme):
    """Same dedup and metadata as torch's planner; the largest plan sent back does not grow with the world."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    largest = {}
    for world in (16, 64):
        writer = SafetensorsWriter(tmp_path / f"{scheme}{world}")
        plans = _plans(scheme, world, writer)
        ours, ours_md = SafetensorsSavePlanner().create_global_plan(plans)
        theirs, theirs_md = DefaultSavePlanner().create_global_plan(plans)
        # Each replicated item kept once, spread over its holders at least as evenly as torch does.
        assert sum(len(p.items) for p in ours) == sum(len(p.items) for p in theirs)
        assert sum(len(p.items) for p in ours) < sum(len(p.items) for p in plans) or scheme != "hsdp"
        load = [sum(i.tensor_storage_size() for i in p.items) for p in ours]
        assert max(load) <= max(sum(i.tensor_storage_size() for i in p.items) for p in theirs)
        assert ours_md.state_dict_metadata.keys() == theirs_md.state_dict_metadata.keys()
        for key, md in ours_md.state_dict_metadata.items():
            assert sorted(map(tuple, (c.offsets for c in md.chunks))) == sorted(
                map(tuple, (c.offsets for c in theirs_md.state_dict_metadata[key].chunks))
            ), key
        final = writer.prepare_global_plan(ours)
        largest[world] = max(len(__import__("pickle").dumps(p)) for p in final)
        writer._save.abort()
    # 4x the ranks: each rank holds 1/4 of the bytes but as many chunks, so its plan stays put.
    assert largest[64] <= largest[16] * 1.25, largest


def test_validation_stays_exact(tmp_path):
    """An overlap, a hole and an out-of-bounds chunk among hundreds of ranks are each caught and named."""
    writer = SafetensorsWriter(tmp_path)
    plans = _plans("fsdp", 128, writer)
    victim = 77
    items = plans[victim].items
    bad = items[0]  # the embedding: 8 rows on every rank
    chunk = bad.tensor_data.chunk
    for offsets, sizes, what in (
        ([chunk.offsets[0] - 1, 0], chunk.sizes, "overlaps"),  # shifted onto its neighbour
        (chunk.offsets, [chunk.sizes[0] - 1, chunk.sizes[1]], "cover"),  # one row short: a hole
        ([chunk.offsets[0], 1], chunk.sizes, "outside"),  # past the last column
    ):
        import dataclasses

        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        new_chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        item = dataclasses.replace(
            bad, index=MetadataIndex(bad.index.fqn, torch.Size(offsets)),
            tensor_data=dataclasses.replace(bad.tensor_data, chunk=new_chunk),
        )
        broken = list(plans)
        broken[victim] = dataclasses.replace(plans[victim], items=[item, *items[1:]])
        with pytest.raises(LayoutError, match=what) as info:
            SafetensorsSavePlanner().create_global_plan(broken)
        assert bad.index.fqn in str(info.value)


def test_collect_chunks_refuses_disagreeing_items(tmp_path):
    writer = SafetensorsWriter(tmp_path)
    plans = _plans("fsdp", 4, writer)
    import dataclasses

    item = plans[2].items[0]
    wrong = dataclasses.replace(item, tensor_data=dataclasses.replace(item.tensor_data, size=torch.Size([999, 64])))
    plans[2] = dataclasses.replace(plans[2], items=[wrong, *plans[2].items[1:]])
    with pytest.raises(LayoutError, match="rank 2 holds"):
        collect_chunks(plans)


def test_repeat_saves_reuse_the_plan_with_a_fresh_snapshot(ranks, tmp_path):
    """Unchanged state dict: no new layout, a new snapshot, the new values; a changed shape: planned again."""
    out = ranks(2).run(scale_cases.repeat_saves, str(tmp_path))
    rank0 = out[0]
    assert [s["planned"] for s in rank0] == [True, False, False, True]
    assert len({s["snapshot"] for s in rank0}) == 4
    assert all(s["same"] for s in rank0)


def test_plan_caching_needs_our_planner(ranks, tmp_path):
    out = ranks(2).run(scale_cases.caching_with_default_planner, str(tmp_path))
    assert "SafetensorsSavePlanner" in out[0]


@pytest.mark.timeout(300)
def test_two_torchrun_nodes_save_and_load(tmp_path):
    """Two torchrun agents as two nodes of two ranks (rendezvous on 127.0.0.1): save, load, compare."""
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    # One attempt, no retry: the job's workers leave with os._exit after destroying their
    # group (scale_cases.torchrun_job says why: gloo threads releasing finished work during
    # interpreter finalization aborted ~1 run in 100). Faulthandler stacks land in the logs.
    codes, logs = _two_node_job(tmp_path / "job", free_port(), result, env)
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(log[-3000:] for log in logs)
    ranks_seen = json.loads(result.read_text())
    assert [r["rank"] for r in ranks_seen] == [0, 1, 2, 3]
    assert [(r["node"], r["local_rank"]) for r in ranks_seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["same"] for r in ranks_seen)


def _two_node_job(root: Path, port: int, result: Path, env: dict) -> tuple[list[int | None], list[str]]:
    """Start two torchrun agents as nodes 0 and 1 of a static rendezvous; their exit codes and logs."""
    root.mkdir()
    # Each agent logs to a file: two PIPEs read one after the other can fill and stall the job.
    logs = [root / f"node{node}.log" for node in (0, 1)]
    agents = []
    for node, log in zip((0, 1), logs, strict=True):
        with open(log, "w") as out:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                 "--nproc-per-node", "2", "--rdzv-backend", "static", "--master-addr", "127.0.0.1",
                 "--master-port", str(port), str(Path(__file__).parent / "scale_cases.py"),
                 str(root / "ckpt"), str(result)],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            ))
    codes: list[int | None] = [None, None]
    try:
        for i, a in enumerate(agents):
            codes[i] = a.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass  # the other node's worker died and this one waits for it: a failed attempt
    finally:
        for a in agents:
            a.kill()
            a.wait()
    return codes, [log.read_text() for log in logs]

