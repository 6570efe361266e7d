"""The README's Python examples run as written, top to bottom, and do what their comments say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import python_blocks

ROOT = os.path.join(os.path.dirname(__file__), "..")

RUNNER = r"""
import json, sys
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__readme__"}
for line, code in blocks:
    try:
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
    except BaseException:
        print(f"README.md: the block at line {line} failed", file=sys.stderr)
        raise
"""


def test_the_readme_examples_run_as_written_and_write_what_they_say(tmp_path):
    blocks = python_blocks(os.path.join(ROOT, "README.md"))
    assert len(blocks) >= 2
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    done = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    # What the comments promise: HF files + index + config.json that transformers and safetensors read.
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    step = tmp_path / "ckpt" / "step-1000"
    names = sorted(os.listdir(step))
    assert "model.safetensors.index.json" in names and "config.json" in names and "training_state" in names
    index = json.loads((step / "model.safetensors.index.json").read_text())
    config = json.loads((step / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(str(step))
    weights = {}
    for file in set(index["weight_map"].values()):
        weights.update(safetensors.torch.load_file(str(step / file)))
    for key, t in model.state_dict().items():
        if key in weights:
            assert torch.equal(t, weights[key]), key
    assert set(weights) >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert (tmp_path / "ckpt" / "step-1001" / "model.safetensors.index.json").exists()
