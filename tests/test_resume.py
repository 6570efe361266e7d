"""FSDP2 + AdamW: save nested training state, resume bit-identically."""

from __future__ import annotations

import json

from cases import train_save_resume
from safetensors import safe_open

from dcp_safetensors import read_checkpoint


def test_fsdp2_adamw_resume_is_bit_identical(ranks, tmp_path):
    results = ranks(2).run(train_save_resume, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["resumed"] == r["reference"], f"rank {rank}: losses diverge after resume"
        assert r["step"] == 3 and isinstance(r["step"], int)
        assert r["cfg"] == {"lr": 1e-2, "warmup": 0, "decay": 0.0, "on": False}
        assert r["cfg_types"] == {"lr": "float", "warmup": "int", "decay": "float", "on": "bool"}

    # The HF part is a plain checkpoint: model keys without the prefix, nothing else in the weight map.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {
        "embed.weight",
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
        "norm.weight",
        "norm.bias",
        "positions",
    }
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(index["weight_map"])
    # Optimizer tensors and counters live in training_state/, outside the weight map.
    ckpt = read_checkpoint(str(tmp_path))
    assert any(k.startswith("optim.state.layers.0.weight.exp_avg") for k in ckpt.tensors)
    assert all(loc.file.startswith("training_state/") for k, loc in ckpt.tensors.items() if k.startswith("optim."))
    objects = json.loads((tmp_path / "training_state" / "objects.json").read_text())
    assert objects["step"] == {"json": 3}
    assert objects["cfg.on"] == {"json": False}
    assert "torch_save" in objects["optim.param_groups.0.betas"]  # a tuple is not JSON-exact
