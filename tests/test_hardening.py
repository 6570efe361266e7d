"""Hardening: pipeline stages, re-saves, callers' state left untouched, Partial placements."""

from __future__ import annotations

import collections
import json
import os
import random

import pytest
import torch
from cases import load_mixed, save_mixed
from hardening_cases import (
    PHASES,
    STAGES,
    load_pipeline,
    pipeline_reference,
    save_leaves_state_untouched,
    save_load_cycles,
    save_partial,
    save_pipeline,
    save_with_injected_failure,
)
from safetensors import safe_open

import dcp_safetensors
from dcp_safetensors import DcpSafetensorsError


def test_pipeline_stages_with_disjoint_keys_make_one_consistent_index(ranks, tmp_path):
    saved = ranks(4).run(save_pipeline, str(tmp_path))
    assert saved[0] == saved[1] and saved[2] == saved[3] and not set(saved[0]) & set(saved[2])
    reference = pipeline_reference(0).state_dict()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(reference)  # every key of both stages, once
    total = 0
    for key, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as f:
            assert key in f.keys()
            tensor = f.get_tensor(key)
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
        total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    assert {reference["lm_head.weight"].dtype, reference["mtp.0.weight"].dtype} == {torch.bfloat16, torch.float32}

    for rank, same in enumerate(ranks(4).run(load_pipeline, str(tmp_path))):
        stage = STAGES[rank // 2]
        assert same and all(any(k.startswith(p + ".") for p in stage) for k in same), rank
        assert all(same.values()), f"rank {rank}: {[k for k, v in same.items() if not v]}"
    # Everything on one rank.
    whole = {k: torch.zeros_like(v) for k, v in reference.items()}
    dcp_safetensors.load(whole, tmp_path)
    assert all(torch.equal(whole[k], reference[k]) for k in reference)


def test_partial_dtensors_are_refused_on_every_rank_and_reduced_ones_save(ranks, tmp_path):
    outcomes = ranks(2).run(save_partial, str(tmp_path / "partial"), False)
    for name, message in outcomes:
        assert name == "ConfigurationError", message
        assert "'w'" in message and "Partial" in message and "redistribute" in message
    assert not (tmp_path / "partial" / "model.safetensors").exists()
    assert ranks(2).run(save_partial, str(tmp_path / "reduced"), True) == [None, None]
    with safe_open(str(tmp_path / "reduced" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("w").tolist() == [3.0] * 4  # 1 + 2, the reduced value


def test_a_save_leaves_the_callers_state_model_and_options_untouched(ranks, tmp_path):
    for rank, checks in enumerate(ranks(2).run(save_leaves_state_untouched, str(tmp_path / "ckpt"))):
        assert all(checks.values()), f"rank {rank}: {checks}"


def _model_files(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("model") and p.name.endswith(".safetensors"))


def test_resaving_fewer_keys_or_files_leaves_nothing_of_the_old_snapshot(tmp_path):
    state = {f"layers.{i}.weight": torch.full((64, 16), float(i)) for i in range(4)}
    state.update({f"mtp.{i}.weight": torch.full((64, 16), -1.0) for i in range(2)})
    dcp_safetensors.save(state, tmp_path, max_shard_size="8KiB")
    assert len(_model_files(tmp_path)) == 3
    for smaller, files in (({k: v for k, v in state.items() if not k.startswith("mtp.")}, 1), (state, 6)):
        dcp_safetensors.save(smaller, tmp_path, max_shard_size="4KiB" if files > 1 else "5GB")
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(smaller)
        assert _model_files(tmp_path) == sorted(set(index["weight_map"].values()))
        assert len(_model_files(tmp_path)) == files
        assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_no_growth_of_fds_threads_or_memory_over_100_save_load_cycles(ranks, tmp_path):
    for rank, seen in enumerate(ranks(2).run(save_load_cycles, str(tmp_path / "ckpt"), 100)):
        print(f"rank {rank} after cycle 10 / 100: {seen}")
        assert seen["fds"][1] <= seen["fds"][0], f"rank {rank}: open file descriptors grew: {seen['fds']}"  # a transient one may close later
        assert seen["threads"][0] == seen["threads"][1], f"rank {rank}: threads grew: {seen['threads']}"
        grown = seen["rss_kib"][1] - seen["rss_kib"][0]
        assert grown < 16 << 10, f"rank {rank}: RSS grew {grown} KiB over 90 cycles"


BITFLIPS_N = int(os.environ.get("DCP_SAFETENSORS_BITFLIPS_N", "2000"))


def test_every_single_bit_flip_in_a_data_file_is_caught_by_verify(tmp_path):
    """``DCP_SAFETENSORS_BITFLIPS_N`` random flips (default 2,000; ``make fuzz`` runs 10,000)."""
    state = {f"w{i}": torch.randn(16, 24).to(dtype) for i, dtype in enumerate([torch.float32, torch.bfloat16] * 3)}
    state["ids"] = torch.arange(40)
    state["mask"] = torch.rand(33) > 0.5
    dcp_safetensors.save(state, tmp_path, max_shard_size="2KB")
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) > 2
    dcp_safetensors.verify(str(tmp_path))
    sizes = {f: f.stat().st_size for f in files}
    rng = random.Random(20261123)
    missed = []
    caught: collections.Counter[str] = collections.Counter()

    def flip(f, pos: int, bit: int) -> None:
        with open(f, "r+b") as fh:
            fh.seek(pos)
            byte = fh.read(1)[0]
            fh.seek(pos)
            fh.write(bytes([byte ^ (1 << bit)]))

    for trial in range(BITFLIPS_N):
        f = rng.choice(files)
        pos, bit = rng.randrange(sizes[f]), rng.randrange(8)
        flip(f, pos, bit)
        try:
            dcp_safetensors.verify(str(tmp_path))
            missed.append((trial, f.name, pos, bit))
        except DcpSafetensorsError as e:
            caught[type(e).__name__] += 1
        flip(f, pos, bit)
    print(f"{BITFLIPS_N} single-bit flips: caught {sum(caught.values())} ({dict(caught)}), missed {len(missed)}")
    assert not missed, missed[:5]
    dcp_safetensors.verify(str(tmp_path))


FAILURE_CASES = [(phase, 0) for phase in PHASES] + [(phase, 1) for phase in ("set-up", "local plan", "write")]


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize(("phase", "fail_rank"), FAILURE_CASES, ids=[f"{p}-rank{r}" for p, r in FAILURE_CASES])
def test_an_exception_in_any_phase_reaches_every_rank_and_keeps_the_previous_checkpoint(ranks, tmp_path, phase, fail_rank):
    ranks(2).run(save_mixed, str(tmp_path))
    before = _files(tmp_path)
    cause = f"injected failure in {phase} on rank {fail_rank}"
    for rank, (seconds, failures) in enumerate(ranks(2).run(save_with_injected_failure, str(tmp_path), phase, fail_rank)):
        assert failures, f"rank {rank}: the save should have failed"
        assert any(cause in message for _, message in failures.values()), f"rank {rank}: {failures}"
        assert seconds < 60, f"rank {rank} took {seconds:.0f} s to raise"
        print(f"failure in {phase} on rank {fail_rank}: rank {rank} raised after {seconds:.2f} s")
    assert _files(tmp_path) == before
    for rank, ok in enumerate(ranks(2).run(load_mixed, str(tmp_path))):
        assert all(ok.values()), f"rank {rank}"


@pytest.mark.parametrize(("phase", "fail_rank"), [("write", 1), ("commit", 0)])
def test_an_exception_while_uploading_or_committing_to_s3_aborts_every_upload(ranks, s3, phase, fail_rank):
    url = s3.url(s3.prefix)
    opts = s3.storage_options
    ranks(2).run(save_mixed, url, "5GB", {"storage_options": opts})
    before = {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)}
    cause = f"injected failure in {phase} on rank {fail_rank}"
    for rank, (seconds, failures) in enumerate(ranks(2).run(save_with_injected_failure, url, phase, fail_rank, opts)):
        assert any(cause in message for _, message in failures.values()), f"rank {rank}: {failures}"
        assert seconds < 60
        print(f"S3 failure in {phase} on rank {fail_rank}: rank {rank} raised after {seconds:.2f} s")
    assert not s3.open_uploads(s3.prefix)
    assert {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)} == before


def test_a_failed_s3_save_changes_none_of_the_previous_checkpoints_objects(s3, monkeypatch):
    """Small files (objects.json, config.json) wait in the commit record: nothing is published before it."""
    from dcp_safetensors.storage.s3 import S3Storage

    url, opts = s3.url(s3.prefix), s3.storage_options
    dcp_safetensors.save({"w": torch.ones(4), "step": 1}, url, storage_options=opts, hf_config={"layers": 1})
    before = {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)}
    assert "training_state/objects.json" in before and "config.json" in before

    original = S3Storage.retry

    def failing_record_put(self, request, name, fn, *args, **kwargs):
        if request == "PutObject" and name.endswith("COMMIT.json"):
            raise dcp_safetensors.errors.StorageError(f"{request} of {self.path(name)}: injected")
        return original(self, request, name, fn, *args, **kwargs)

    monkeypatch.setattr(S3Storage, "retry", failing_record_put)
    with pytest.raises(dcp_safetensors.errors.StorageError, match="COMMIT.json: injected"):
        dcp_safetensors.save({"w": torch.zeros(4), "step": 2}, url, storage_options=opts, hf_config={"layers": 2})
    monkeypatch.undo()
    assert {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)} == before
    assert not s3.open_uploads(s3.prefix)
    state = {"w": torch.zeros(4), "step": 0}
    dcp_safetensors.load(state, url, storage_options=opts)
    assert state["step"] == 1 and state["w"].tolist() == [1.0] * 4


def test_non_tensor_values_keep_their_python_types_and_values_without_pickle(tmp_path):
    values = {
        "zero": 0, "zero_f": 0.0, "no": False, "none": None, "text": "cosine", "big": 2**62 + 1, "tiny": -3.5e-9,
        "nested": {"lr": [1e-3, 2], "sched": {"kind": "warmup", "steps": [0, 10, 100], "on": True}},
    }
    dcp_safetensors.save({"w": torch.ones(2), **values}, tmp_path)
    stored = json.loads((tmp_path / "training_state" / "objects.json").read_text())
    assert not any("torch_save" in json.dumps(v) for v in stored.values())  # JSON, no pickle
    target = {"w": torch.zeros(2), **{k: object() for k in values}}
    target["nested"] = {"lr": object(), "sched": {"kind": object(), "steps": object(), "on": object()}}
    dcp_safetensors.load(target, tmp_path)
    for key, value in values.items():
        assert target[key] == value and type(target[key]) is type(value), (key, target[key])
    assert type(target["nested"]["sched"]["steps"][2]) is int and type(target["nested"]["lr"][0]) is float


def test_data_files_and_directories_are_durable_before_the_commit_and_nothing_published_earlier(tmp_path, monkeypatch):
    state = {f"w{i}": torch.full((256, 64), float(i)) for i in range(4)}
    dcp_safetensors.save(state, tmp_path, max_shard_size="64KiB")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst, *a, **k)

    def open_(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR):
            events.append(("open-write", str(path)))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", open_)
    dcp_safetensors.save({k: v + 10 for k, v in state.items()}, tmp_path, max_shard_size="64KiB")
    monkeypatch.undo()

    commit = next(i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith("COMMIT.json"))
    staging = next(what for kind, what in events if kind == "open-write" and what.endswith(".safetensors")).rsplit("/", 1)[0]
    before, after = events[:commit], events[commit + 1 :]
    written = {what for kind, what in before if kind == "open-write" and what.endswith(".safetensors")}
    assert len(written) == 4 and all(w.startswith(staging) for w in written)
    assert written <= {what for kind, what in before if kind == "fsync"}, "a data file was not fsynced before the commit"
    # Before the commit point nothing outside staging (and the directory it is built in, then
    # renamed from) is written or renamed.
    assert all(what.startswith(staging) or "/.dcp_safetensors-building-" in what
               for kind, what in before if kind in ("open-write", "replace"))
    # The commit record's rename is made durable (staging fsynced) before anything is published.
    first_publish = next(i for i, (kind, what) in enumerate(after) if kind == "replace")
    assert ("fsync", staging) in after[:first_publish]
