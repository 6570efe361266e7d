"""Options that differ between ranks: one error on every rank within seconds, never a hang.

Every option and precondition of a planner, writer or reader is made to
differ on one rank of two (tests/agreement_cases.py). Every rank must raise
an error naming it within seconds, and an ``all_reduce`` afterwards must
succeed: the process group survives for the next training step.
"""

from __future__ import annotations

import agreement_cases as cases
import pytest

from dcp_safetensors.agreement import check_agreement, describe, differences
from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.mapping import KeyMapping

# What each error must name, where it is not the case's own name.
NAMED = {
    "hf_config": "config files",
    "invalid max_shard_size": "max_shard_size",
    "plain dcp.save, max_shard_size": "max_shard_size",
    "planner class": "but not on rank 1",
    "meta tensor": "meta",
    "key mapping collision": "both map to",
    "broadcast, key mapping collision": "both map to",
    "broadcast, other plain tensors": "other plain tensors",
    "save_submodule of a submodule on no rank": "no submodule 'head' (on any rank)",
}


@pytest.fixture(scope="module")
def root(ranks, tmp_path_factory):
    path = tmp_path_factory.mktemp("agreement")
    ranks(2).run(cases.prepare, str(path))
    return path


@pytest.mark.parametrize(("kind", "name"), [("save", n) for n in cases.SAVES] + [("load", n) for n in cases.LOADS])
def test_an_option_on_one_rank_is_one_error_everywhere(ranks, root, kind: str, name: str) -> None:
    out = ranks(2).run(cases.run_case, kind, name, str(root), timeout=60)
    for rank, result in enumerate(out):
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert NAMED.get(name, name) in result["error"], f"rank {rank}: {result['error']}"
        assert "Timeout" not in result["error"] and result["seconds"] < 10, result
        assert result["all_reduce"] == 2.0
    print(f"{kind} {name}: every rank raised within {max(r['seconds'] for r in out):.2f} s")


def test_save_submodule_of_a_pipeline_stage(ranks, tmp_path) -> None:
    """A submodule on some ranks only (pipeline stages) is saved from them; the others take part."""
    import safetensors.torch
    import torch

    out = ranks(2).run(cases.save_submodule_of_one_stage, str(tmp_path))
    saved = safetensors.torch.load_file(str(tmp_path / "draft" / "model.safetensors"))
    assert sorted(saved) == sorted(out[1]) == ["bias", "weight"]
    assert all(torch.equal(saved[k], out[1][k]) for k in saved)


def test_local_knobs_may_differ(ranks, root) -> None:
    ranks(2).run(cases.local_knobs, str(root))


def test_describe_is_the_same_in_every_process() -> None:
    """A function's repr holds its address; its description is its name."""
    mapping = KeyMapping(rename=str.lower, include=lambda k: True)
    assert describe(mapping) == describe(KeyMapping(rename=str.lower, include=lambda k: True))
    assert "0x" not in repr(describe(mapping))


def test_check_agreement_names_every_option_and_rank() -> None:
    check_agreement("X", [{"a": 1}, {"a": 1}])
    check_agreement("X", [None, None])
    with pytest.raises(ConfigurationError, match=r"a is 1 on ranks 0, 2, 2 on rank 1; b is"):
        check_agreement("X", [{"a": 1, "b": 0}, {"a": 2, "b": 1}, {"a": 1, "b": 1}])
    with pytest.raises(ConfigurationError, match=r"X is used on rank 0 but not on rank 1"):
        check_agreement("X", [{"a": 1}, None])
    assert differences([{"a": [1]}, {"a": [1]}]) == []
