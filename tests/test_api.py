"""High-level save/load/async_save, HF config files, progress logging."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp
from cases import api_roundtrip, async_save_while_training

import dcp_safetensors
from dcp_safetensors import SafetensorsWriter
from dcp_safetensors.errors import CheckpointNotFoundError, ConfigurationError


def test_api_roundtrip_with_config_on_two_ranks(ranks, tmp_path):
    for r in ranks(2).run(api_roundtrip, str(tmp_path)):
        assert r == {"same": True, "step": 5, "error": "CheckpointNotFoundError"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"model_type": "toy", "hidden_size": 16, "dtype": "float32"}  # auto_map stripped; the weights' dtype
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "embed.weight" in index["weight_map"]


def test_async_save_commits_the_state_at_the_call_while_training_goes_on(ranks, tmp_path):
    for rank, r in enumerate(ranks(2).run(async_save_while_training, str(tmp_path))):
        assert r["steps_in_flight"] >= 1, f"rank {rank}: no training step ran while the save was in flight"
        assert r["changed"], "training changed the live weights"
        assert r["matches_call"], f"rank {rank}: the checkpoint differs from the state at the async_save call"
    dcp_safetensors.verify(str(tmp_path))


def test_api_without_process_group_raises_our_error_types(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint here"):
        dcp_safetensors.load({"w": torch.zeros(1)}, tmp_path / "missing")


class _Config:
    def to_dict(self) -> dict:
        return {"architectures": ["Toy"], "auto_map": {"AutoModel": "x.Y"}, "vocab_size": 3}


def test_config_objects_and_generation_config_are_committed_with_the_weights(tmp_path):
    dcp_safetensors.save(
        {"w": torch.ones(2)}, tmp_path, hf_config=_Config(), generation_config={"max_new_tokens": 5}, strip_auto_map=False
    )
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {"AutoModel": "x.Y"}
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"max_new_tokens": 5}
    with pytest.raises(ConfigurationError, match="config.json"):
        SafetensorsWriter(tmp_path, hf_config=object())


def test_config_json_gets_the_saved_weights_dtype_and_the_models_class_as_save_pretrained_writes_them(tmp_path, caplog):
    """A model built from a config has "architectures": null and "dtype": null in its config; vLLM then
    resolved LlamaModel. Given the model, config.json names its class; given the config, a warning says
    what is missing; either way dtype is the saved weights' (here cast to bf16 on save)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dcp_safetensors import SafetensorsSavePlanner

    def build():
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=256)
        return AutoModelForCausalLM.from_config(config)

    reference = build().to(torch.bfloat16)
    reference.save_pretrained(str(tmp_path / "reference"))
    theirs = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert theirs["dtype"] == "bfloat16" and theirs["architectures"] == ["LlamaForCausalLM"]

    model = build()
    bf16 = SafetensorsSavePlanner(dtype=torch.bfloat16)
    dcp.save(model.state_dict(), storage_writer=SafetensorsWriter(tmp_path / "model", hf_config=model), planner=bf16)
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == theirs

    with caplog.at_level(logging.WARNING, logger="dcp_safetensors"):
        dcp.save(model.state_dict(), storage_writer=SafetensorsWriter(tmp_path / "config", hf_config=model.config),
                 planner=SafetensorsSavePlanner(dtype=torch.bfloat16))
    ours = json.loads((tmp_path / "config" / "config.json").read_text())
    assert ours["dtype"] == "bfloat16" and "architectures" not in ours
    assert {k: v for k, v in ours.items()} == {k: v for k, v in theirs.items() if k != "architectures"}
    assert "pass hf_config=model" in caplog.text


@pytest.mark.parametrize("min_files", [0, -2])
def test_min_files_below_one_is_refused_at_construction(tmp_path, min_files):
    with pytest.raises(ConfigurationError, match=f"min_files must be at least 1 .*not {min_files}"):
        dcp_safetensors.SafetensorsWriter(tmp_path, min_files=min_files)


def test_save_logs_bytes_files_and_phases(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="dcp_safetensors"):
        dcp_safetensors.save({"w": torch.ones(1000)}, tmp_path)
        dcp_safetensors.load({"w": torch.zeros(1000)}, tmp_path)
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved ")]
    assert saved and "1 files" in saved[0] and "MB/s" in saved[0] and "plan" in saved[0] and "commit" in saved[0]
    assert any(r.getMessage().startswith("loaded ") and "MB/s" in r.getMessage() for r in caplog.records)
    # Nothing at INFO or above for a save that takes well under a second.
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name == "dcp_safetensors"]


def test_async_save_in_process_mode_pickles_the_writer(tmp_path):
    """dcp.async_save(PROCESS) pickles our writer into a checkpoint process with a fresh gloo group."""
    import async_process_worker
    from helpers import process_context

    ckpt, stdout, stderr = tmp_path / "ckpt", tmp_path / "stdout", tmp_path / "stderr"
    # Not the rank pool's: its ranks are daemonic and may not start the checkpoint process.
    proc = process_context().Process(target=async_process_worker.run, args=(str(ckpt), str(stdout), str(stderr)))
    proc.start()
    proc.join(240)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    assert proc.exitcode == 0, stderr.read_text()[-3000:]
    assert stdout.read_text().count("OK") == 2, stdout.read_text()[-2000:]
    dcp_safetensors.verify(str(ckpt))
