"""Plan caching under mutation: every save of a sequence gives the bytes a fresh save would.

A stateful property test (hypothesis ``RuleBasedStateMachine``) drives
sequences of saves on 1 rank (no process group) and on 2 gloo ranks, with
mutations between them: a dtype cast, a key added, removed or renamed, a
reshape, a new placement or mesh, other ``max_shard_size``/``model_prefix``/
key mapping/cast-on-save options, plan caching on or off, DCP's own planner,
a new or the same directory, a new planner, and a replicated tensor whose
dtype differs between ranks. After every save it compares every file, byte
for byte, with ``safetensors.torch.save_file`` of the full tensors it should
hold, checks the directory holds no other data file, and loads the
checkpoint back. ``make soak`` runs it for thousands of saves
(``DCP_SAFETENSORS_SOAK=1``).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import plan_cache_cases as cases
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dcp_safetensors
from dcp_safetensors.names import TRAINING_STATE_DIR

SOAK = os.environ.get("DCP_SAFETENSORS_SOAK") == "1"
EXAMPLES = 300 if SOAK else int(os.environ.get("DCP_SAFETENSORS_STATEFUL_EXAMPLES", "40"))
STEPS = 30 if SOAK else 14

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from(sorted(cases.DTYPES))
placements = st.sampled_from(["plain", "rep", "s0", "s1", "2d"])
seeds = st.integers(0, 10_000)


def _fit(shape: tuple[int, ...], placement: str) -> str:
    """A placement valid for ``shape`` (Shard(1) needs two dims)."""
    return "s0" if placement == "s1" and len(shape) < 2 else placement


def _canonical(raw: bytes) -> tuple[Any, ...]:
    """A file's bytes with its ``__metadata__`` pairs sorted: safetensors orders them its own way."""
    (n,) = struct.unpack("<Q", raw[:8])
    pairs = json.loads(raw[8 : 8 + n], object_pairs_hook=list)
    metadata = sorted(next((v for k, v in pairs if k == "__metadata__"), []))
    return n, metadata, [(k, v) for k, v in pairs if k != "__metadata__"], raw[8 + n :]


def expected_files(root: Path, spec: cases.Spec, options: dict[str, Any]) -> None:
    """Every data file equals save_file of the full tensors it holds; the keys are exactly the spec's."""
    ours = options["planner"] != "dcp"
    mapping = cases.mapping_of(options) if ours else None
    cast = options["planner_dtype"] if ours else None
    expected: dict[str, torch.Tensor] = {}
    for key, (shape, dtype, _, seed) in spec.items():
        tensor = cases.full_tensor(shape, dtype, seed)
        if cast and tensor.is_floating_point():
            tensor = tensor.to(cases.DTYPES[cast])
        expected[mapping.name_of(key) if mapping else key] = tensor
    ckpt = dcp_safetensors.read_checkpoint(str(root))
    assert sorted(ckpt.tensors) == sorted(expected), "the checkpoint's keys are not the state dict's"
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for key, loc in ckpt.tensors.items():
        header = ckpt.headers[loc.file]
        prefix = f"{ckpt.model_prefix}." if ckpt.model_prefix else ""
        name = key[len(prefix):] if prefix and key.startswith(prefix) and key[len(prefix):] in header.tensors else key
        by_file.setdefault(loc.file, {})[name] = expected[key]
    for file, tensors in by_file.items():
        reference = root.parent / f"reference-{uuid.uuid4().hex}.safetensors"
        safetensors.torch.save_file(tensors, str(reference), metadata=ckpt.headers[file].metadata)
        assert _canonical((root / file).read_bytes()) == _canonical(reference.read_bytes()), f"{file} differs from save_file's"
        reference.unlink()
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*.safetensors") if ".dcp_safetensors" not in str(p)}
    assert on_disk == set(by_file), f"data files on disk {sorted(on_disk)} != the checkpoint's {sorted(by_file)}"


class SaveSequence(RuleBasedStateMachine):
    """Saves with mutations in between; ``pool`` is None on 1 rank (no process group)."""

    pool: Any = None
    root: Path = Path(".")
    reused = 0  # saves whose plan the cache served, over the whole run
    total = 0  # saves of the whole run

    @initialize()
    def start(self) -> None:
        self.spec: cases.Spec = {
            "model.embed": ((9, 4), "float32", "s0", 1),
            "model.norm": ((4,), "bfloat16", "rep", 2),
            "model.proj": ((6, 5), "float16", "s1", 3),
            "state.count": ((3,), "int32", "plain", 4),
        }
        self.options: dict[str, Any] = {
            "planner": "cached", "slot": uuid.uuid4().hex, "mapping": None, "planner_dtype": None,
            "max_shard_size": "5GB", "model_prefix": None,
        }
        self.path = self.root / uuid.uuid4().hex
        self.diverged: str | None = None
        self.saves = 0

    def _files(self) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in self.path.rglob("*") if p.is_file()} if self.path.exists() else {}

    def _run(self, fn: Any, *args: Any) -> list[Any]:
        return self.pool.run(fn, *args) if self.pool is not None else [fn(*args)]

    def _save(self) -> None:
        before = self._files() if self.diverged is not None else {}  # the refused save must leave them so
        out = self._run(cases.save_and_load, self.spec, self.options, str(self.path), self.diverged)
        self.saves += 1
        type(self).total += 1
        if self.diverged is not None:
            # A replicated tensor of another dtype on one rank: refused on every rank, and
            # the checkpoint already in the directory is untouched.
            for result in out:
                assert result["error"] is not None, f"{self.diverged!r} differs between ranks but was saved"
                assert "LayoutError" in result["error"] or "RankFailedError" in result["error"], result["trace"]
            mapping = cases.mapping_of(self.options) if self.options["planner"] != "dcp" else None
            assert (mapping.name_of(self.diverged) if mapping else self.diverged) in out[0]["error"], out[0]["error"]
            assert self._files() == before, "a refused save changed the directory"
            self.diverged = None
            return
        for result in out:
            assert result["error"] is None, result["trace"]
            assert result["wrong"] == [], f"loaded back wrong: {result['wrong']}"
        type(self).reused += out[0]["reused"]
        expected_files(self.path, self.spec, self.options)

    def _key(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.spec)))

    @rule()
    def save_unchanged(self) -> None:
        self._save()

    @rule()
    def save_unchanged_again(self) -> None:  # unchanged saves are the ones a cache serves
        self._save()

    @rule(data=st.data(), dtype=dtypes)
    def cast(self, data: st.DataObject, dtype: str) -> None:
        key = self._key(data)
        shape, _, placement, seed = self.spec[key]
        self.spec[key] = (shape, dtype, placement, seed)
        self._save()

    @rule(data=st.data(), dtype=st.sampled_from(["float16", "bfloat16"]))
    def cast_same_itemsize(self, data: st.DataObject, dtype: str) -> None:
        """bf16 <-> fp16: the same bytes count, so only the header tells them apart."""
        key = self._key(data)
        shape, old, placement, seed = self.spec[key]
        self.spec[key] = (shape, "float16" if old == "bfloat16" else "bfloat16", placement, seed)
        self._save()

    @rule(shape=shapes, dtype=dtypes, placement=placements, seed=seeds, model=st.booleans())
    def add_key(self, shape: tuple[int, ...], dtype: str, placement: str, seed: int, model: bool) -> None:
        key = f"{'model' if model else 'state'}.t{len(self.spec)}_{seed}"
        self.spec[key] = (shape, dtype, _fit(shape, placement), seed)
        self._save()

    @precondition(lambda self: len(self.spec) > 1)
    @rule(data=st.data())
    def remove_key(self, data: st.DataObject) -> None:
        del self.spec[self._key(data)]
        self._save()

    @rule(data=st.data())
    def rename_key(self, data: st.DataObject) -> None:
        key = self._key(data)
        self.spec[f"{key}_r"] = self.spec.pop(key)
        self._save()

    @rule(data=st.data(), shape=shapes)
    def reshape(self, data: st.DataObject, shape: tuple[int, ...]) -> None:
        key = self._key(data)
        _, dtype, placement, seed = self.spec[key]
        self.spec[key] = (shape, dtype, _fit(shape, placement), seed)
        self._save()

    @rule(data=st.data(), placement=placements)
    def place(self, data: st.DataObject, placement: str) -> None:
        key = self._key(data)
        shape, dtype, _, seed = self.spec[key]
        self.spec[key] = (shape, dtype, _fit(shape, placement), seed)
        self._save()

    @rule(size=st.sampled_from(["5GB", 64, 200, 1000]))
    def max_shard_size(self, size: int | str) -> None:
        self.options["max_shard_size"] = size
        self._save()

    @rule(prefix=st.sampled_from([None, "model"]))
    def model_prefix(self, prefix: str | None) -> None:
        self.options["model_prefix"] = prefix
        self._save()

    @rule(mapping=st.sampled_from([None, "strip"]), cast=st.sampled_from([None, "bfloat16"]))
    def planner_options(self, mapping: str | None, cast: str | None) -> None:
        self.options.update(mapping=mapping, planner_dtype=cast)
        self._save()

    @rule(kind=st.sampled_from(["cached", "fresh", "dcp"]))
    def planner_kind(self, kind: str) -> None:
        self.options["planner"] = kind
        self._save()

    @rule()
    def new_planner(self) -> None:
        self.options["slot"] = uuid.uuid4().hex
        self._save()

    @rule()
    def new_directory(self) -> None:
        self.path = self.root / uuid.uuid4().hex
        self._save()

    @precondition(lambda self: self.pool is not None and self.saves > 0)
    @rule(data=st.data())
    def diverge_between_ranks(self, data: st.DataObject) -> None:
        replicated = sorted(k for k, v in self.spec.items() if v[2] in ("plain", "rep"))
        if not replicated:
            return
        self.diverged = data.draw(st.sampled_from(replicated))
        self._save()

    @invariant()
    def directory_is_not_empty_after_a_save(self) -> None:
        if self.saves:
            assert any(self.path.glob("*.safetensors")) or any((self.path / TRAINING_STATE_DIR).glob("*"))


def _run_machine(pool: Any, root: Path, examples: int) -> None:
    machine = type("Machine", (SaveSequence,), {"pool": pool, "root": root})
    machine.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    machine.TestCase().runTest()
    assert machine.reused > 0, "no save reused a cached plan: the cache was not tested"
    print(f"{machine.total} saves, each checked against save_file and loaded back; {machine.reused} reused a cached plan")


@pytest.mark.timeout(900 if SOAK else 120)
def test_saves_under_mutation_one_rank(tmp_path: Path) -> None:
    _run_machine(None, tmp_path, EXAMPLES)


@pytest.mark.timeout(1800 if SOAK else 150)
def test_saves_under_mutation_two_ranks(ranks, tmp_path: Path) -> None:
    _run_machine(ranks(2), tmp_path, EXAMPLES)


def _sequence(pool: Any, root: Path) -> SaveSequence:
    machine = type("Machine", (SaveSequence,), {"pool": pool, "root": root})()
    machine.start()
    machine.save_unchanged()
    return machine


def _recast(machine: SaveSequence, key: str, dtype: str) -> None:
    shape, _, placement, seed = machine.spec[key]
    machine.spec[key] = (shape, dtype, placement, seed)
    machine.save_unchanged()


# The sequences that wrote wrong bytes or failed under DCP's plan comparison (issue 15, A),
# fixed here so every run walks them.


def test_same_itemsize_cast_between_saves(tmp_path: Path) -> None:
    """bf16 -> fp16 between two cached saves: fp16 headers over fp16 bytes (was BF16 headers, no error)."""
    _recast(_sequence(None, tmp_path), "model.norm", "float16")


def test_narrowing_cast_between_saves(tmp_path: Path) -> None:
    """fp32 -> bf16 between two cached saves is planned again (was a LayoutError about planned bytes)."""
    _recast(_sequence(None, tmp_path), "model.embed", "bfloat16")


def test_two_ranks_cast_between_saves(ranks, tmp_path: Path) -> None:
    machine = _sequence(ranks(2), tmp_path)
    _recast(machine, "model.norm", "float16")
    _recast(machine, "model.embed", "bfloat16")


def test_replicated_dtype_clash_refused_on_a_cached_save(ranks, tmp_path: Path) -> None:
    """Refused on the first save, and on a save after a cached one (was saved from one rank)."""
    machine = _sequence(ranks(2), tmp_path)
    machine.save_unchanged()
    machine.diverged = "state.count"
    machine.save_unchanged()
    machine.save_unchanged()  # and the cache serves the next good saves again
    before = machine.reused
    machine.save_unchanged()
    assert machine.reused == before + 1


def test_a_new_planner_on_one_rank_is_one_clear_error(ranks, tmp_path: Path) -> None:
    """Digests the coordinator never cached: refused on every rank, then planned from scratch."""
    for errors in ranks(2).run(cases.new_planner_on_one_rank, str(tmp_path)):
        assert errors[0] is None and errors[2] is None, errors
        assert errors[1] is not None and "sent an unchanged plan" in errors[1] and "[1]" in errors[1], errors
    assert not (tmp_path / "step1" / "model.safetensors").exists()


def test_a_layout_serves_every_directory(tmp_path: Path) -> None:
    """A training loop saves each step to its own directory: the plan is reused across them."""
    machine = _sequence(None, tmp_path)
    before = machine.reused
    machine.new_directory()
    machine.new_directory()
    assert machine.reused == before + 2


def test_a_reused_layout_the_rank_does_not_hold_is_refused(ranks, tmp_path: Path) -> None:
    """Every rank checks the id of the layout the coordinator reused against its own cached plan."""
    out = ranks(2).run(cases.two_planners_on_one_rank, str(tmp_path))
    for errors in out:
        assert errors[0] is None and errors[1] is None and errors[3] is None, errors
        assert errors[2] is not None, errors
    assert "does not hold" in out[1][2]
    assert not (tmp_path / "step2" / "model.safetensors").exists()
    assert (tmp_path / "step3" / "model.safetensors").exists()
