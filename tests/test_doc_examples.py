"""The examples of docs/ run as written, in order, and do what they say (README's: tests/test_readme.py).

Every ```python and ```sh block of a doc runs, in the doc's order, in one process per doc and one
temporary directory (its working directory):

* a ``python`` block is exec'd in one namespace for the whole doc: a later block uses what an
  earlier one defined, as a reader reading on would (``model``, ``config``, imports);
* a ``python`` block whose first line says ``run with: torchrun ...`` is written to the file it
  names and launched by that command (``python -m torch.distributed.run``): a 2-rank gloo job on
  CPU (``CUDA_VISIBLE_DEVICES`` is empty: two ranks on one GPU would be NCCL's error, not ours);
* a ``sh`` block runs in ``bash -e -o pipefail`` with the venv's scripts (``dcp-safetensors``) on
  ``PATH`` and the AWS environment variables pointing at the suite's moto server (bucket ``ckpt``
  and ``bucket``; ``S3_ENDPOINT`` too);
* a transcript (a block without an info string whose lines start with ``$ ``) runs command by
  command; each command's output must be the one shown, up to snapshot ids and CRC-32 values.

A block that cannot run here says why on the line before it: ``<!-- not run: reason -->``.
Python checks of what the examples promise run right after (or before) the block whose code holds
their key, in a copy of the doc's namespace (they see its names, and ``sh_output``, the stdout of
the last ``sh`` block, and add none); each key must be in exactly one block, so a rewritten
example makes its check fail loudly instead of being skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import FencedBlock, fenced_blocks

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOCS = ["user-guide.md", "design.md", "cli.md", "troubleshooting.md"]
MAX_NOT_RUN = 3  # in all of DOCS: each one needs a reason, and there should be few
TORCHRUN = re.compile(r"^#.*\brun with:?\s+`?torchrun\s+(.*?\s(\S+\.py))`?\s*$")

RUNNER = r"""
import json, os, re, subprocess, sys

doc, items = json.load(open(sys.argv[1]))
namespace = {"__name__": "__doc_example__"}
prev_rc, sh_output = 0, ""


def fail(item, message):
    sys.exit(f"{doc}, the {item['kind']} at line {item['line']}: {message}")


def normalize(lines):
    out = [re.sub(r"\bcrc32:[0-9a-f]{8}\b", "crc32:<crc>", re.sub(r"\b[0-9a-f]{32}\b", "<snapshot>", line.rstrip()))
           for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def progress(line):  # a tqdm progress bar's line on stderr
    return re.match(r"^\s*[\w-]+:\s+\d+%\|", line) is not None


for item in items:
    kind, code = item["kind"], item["code"]
    print(f"--- {doc}:{item['line']} ({kind})", file=sys.stderr, flush=True)
    if kind in ("python", "setup", "check"):
        try:  # a check sees the doc's names but adds none: an example must not lean on a check's import
            scope = {**namespace, "sh_output": sh_output} if kind == "check" else namespace
            exec(compile(code, f"{doc}, {kind} at line {item['line']}", "exec"), scope)
        except BaseException:
            print(f"{doc}: the {kind} at line {item['line']} failed", file=sys.stderr)
            raise
    elif kind == "torchrun":
        with open(item["file"], "w") as f:
            f.write(code)
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *item["args"]],
                              capture_output=True, text=True, timeout=240)
        if done.returncode:
            fail(item, f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    elif kind == "sh":
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], capture_output=True, text=True, timeout=240)
        sh_output = done.stdout
        if done.returncode:
            fail(item, f"exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    elif kind == "command":
        done = subprocess.run(["bash", "-c", f"(exit {prev_rc}); {code}"], capture_output=True, text=True, timeout=240)
        prev_rc = done.returncode
        stderr = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip() and not progress(line)]
        shown, ran = normalize(item["expected"]), normalize(done.stdout.splitlines() + stderr)
        if shown != ran:
            fail(item, "`$ " + code + "` printed\n" + "\n".join(ran) + "\n\nwhere the doc shows\n" + "\n".join(shown))
    else:
        fail(item, "unknown kind")
"""


# --- what the examples promise, checked in the doc's namespace after the block holding the key ---

USER_GUIDE_CHECKS = {
    "save_resume.py": """
import json, os
from safetensors import safe_open
step = "ckpt/step-1000"
index = json.load(open(f"{step}/model.safetensors.index.json"))
weights = set(index["weight_map"])
assert "model.embed_tokens.weight" in weights and "lm_head.weight" in weights, weights   # prefix "model." stripped
assert not any(k.startswith(("model.model.", "optim.")) for k in weights), weights
assert sorted(os.listdir(f"{step}/training_state")) == ["objects.json", "state.safetensors"]
with safe_open(f"{step}/training_state/state.safetensors", "pt") as f:
    moments = set(f.keys())
assert "optim.state.model.embed_tokens.weight.exp_avg" in moments and all(k.startswith("optim.") for k in moments), moments
objects = json.load(open(f"{step}/training_state/objects.json"))
assert "1000" in json.dumps(objects) and "0.0003" in json.dumps(objects), objects
""",
    'SafetensorsReader("qwen2-tiny/")': """
import safetensors.torch
import torch
stored = safetensors.torch.load_file("qwen2-tiny/model.safetensors")
assert "lm_head.weight" not in stored and all(torch.equal(sd[k], stored[k]) for k in stored)
assert torch.equal(sd["lm_head.weight"], stored["model.embed_tokens.weight"])
own = {k: torch.zeros_like(v) for k, v in sd.items()}          # lm_head.weight a tensor of its own
dcp.load(own, storage_reader=SafetensorsReader("qwen2-tiny/"))
assert torch.equal(own["lm_head.weight"], stored["model.embed_tokens.weight"])
""",
    "storage_options=opts": """
import torch
back = {k: torch.zeros_like(v) for k, v in sd.items()}
dcp.load(back, storage_reader=SafetensorsReader("s3://bucket/run/step-1000", storage_options=opts))
assert all(torch.equal(back[k], sd[k]) for k in sd)
""",
    'hf_config=model)': """
import json
import torch
assert json.load(open("export/config.json"))["architectures"] == ["Qwen2ForCausalLM"]
ids = torch.arange(12).reshape(2, 6)
with torch.no_grad():   # no dropout in this config: train mode's logits are eval mode's
    assert torch.equal(exported(ids).logits, model(ids).logits)
""",
    '"ckpt/step-2000"': """
import json
assert future.done() and state["step"] == 2000
assert "model.embed_tokens.weight" in json.load(open("ckpt/step-2000/model.safetensors.index.json"))["weight_map"]
""",
    "AsyncSaver(max_pending=1)": """
import os
import torch
def saved(step):
    state = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}, "step": -1}
    dcp_safetensors.load(state, f"ckpt/step-{step}")
    assert state["step"] == step
    return state["model"]
last, first = saved(200), saved(0)
assert set(os.listdir("ckpt")) >= {"step-0", "step-100", "step-200"}
assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())           # the state at the call
assert not torch.equal(first["model.embed_tokens.weight"], last["model.embed_tokens.weight"])
""",
    "KeyMapping(include": """
import json
import torch
from safetensors import safe_open
index = json.load(open("export/bf16/model.safetensors.index.json"))
assert "embed_tokens.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
assert not any(k.startswith("model.") for k in index["weight_map"])
for file in set(index["weight_map"].values()):
    with safe_open(f"export/bf16/{file}", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
assert all(torch.equal(v, v.bfloat16().float()) for k, v in sd.items() if k.startswith("model."))
""",
    "Qwen3MoeConfig(": """
import json
moe_keys = json.load(open("ckpt/moe/model.safetensors.index.json"))["weight_map"]
assert "model.layers.1.mlp.experts.3.down_proj.weight" in moe_keys
assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in moe_keys)
""",
    'torch.device("meta")': """
import json
import torch
from safetensors import safe_open
assert not any(t.is_meta for t in model.state_dict().values())
moe_keys = json.load(open("ckpt/moe/model.safetensors.index.json"))["weight_map"]
key = "model.layers.0.mlp.experts.1.gate_proj.weight"
with safe_open(f"ckpt/moe/{moe_keys[key]}", "pt") as f:
    gate = f.get_tensor(key)
assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[1, : gate.shape[0]], gate)
""",
    "gpt_oss_style = (": """
import json
import torch
from safetensors import safe_open
from transformers import GptOssConfig
gpt = AutoModelForCausalLM.from_config(GptOssConfig(
    vocab_size=64, hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)).state_dict()
dcp_safetensors.save(gpt, "export/gpt-oss-style", planner=planner)
files = json.load(open("export/gpt-oss-style/model.safetensors.index.json"))["weight_map"]
def stored(key):
    with safe_open(f"export/gpt-oss-style/{files[key]}", "pt") as f:
        return f.get_tensor(key)
gate_up, down = gpt["model.layers.0.mlp.experts.gate_up_proj"], gpt["model.layers.0.mlp.experts.down_proj"]
assert torch.equal(stored("model.layers.0.mlp.experts.2.gate_proj.weight"), gate_up[2][:, 0::2].T)
assert torch.equal(stored("model.layers.0.mlp.experts.2.up_proj.weight"), gate_up[2][:, 1::2].T)
assert torch.equal(stored("model.layers.0.mlp.experts.2.down_proj.weight"), down[2].T)
""",
    "save_submodule(": """
import safetensors.torch
import torch
draft = safetensors.torch.load_file("export/draft/model.safetensors")
assert sorted(draft) == ["bias", "weight"]
assert torch.equal(draft["weight"], model["draft"].weight) and torch.equal(draft["bias"], model["draft"].bias)
""",
}

DESIGN_CHECKS = {
    'SafetensorsReader("s3://bucket/run/step-1000")': """
import torch
back = {"embed.weight": torch.zeros(256, 64), "step": 0}
dcp.load(back, storage_reader=SafetensorsReader("s3://bucket/run/step-1000"))
assert torch.equal(back["embed.weight"], sd["embed.weight"]) and back["step"] == 1000
""",
}

# What cli.md's examples run on: the checkpoint its transcripts show (ckpt/step-1000: 2 model files and
# training_state/, as `inspect` prints it), one on S3, a torch .distcp save and a save_pretrained model.
CLI_SETUP = """
import torch
import torch.distributed.checkpoint as dcp
import dcp_safetensors
from transformers import AutoModelForCausalLM, LlamaConfig

torch.manual_seed(0)
state = {"model": {"embed.weight": torch.randn(1000, 64), "layers.0.weight": torch.randn(64, 64, dtype=torch.bfloat16),
                   "layers.1.weight": torch.randn(64, 64, dtype=torch.bfloat16), "norm.weight": torch.ones(64)},
         "optim": {"embed.weight.exp_avg": torch.zeros(1000, 64)}, "step": 1000, "cfg": {"lr": 3e-4}}
dcp_safetensors.save(state, "ckpt/step-1000", model_prefix="model", max_shard_size=260_000)
dcp_safetensors.save(state, "s3://ckpt/run1/step-1000", model_prefix="model")

model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, vocab_size=256))
optimizer = torch.optim.AdamW(model.parameters())
model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
optimizer.step()
dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 1000},
         storage_writer=dcp.FileSystemWriter("runs/step-1000.distcp"))
model.save_pretrained("models/llama")
"""

CLI_CHECKS = {
    "$ dcp-safetensors inspect ckpt/step-1000": """
import subprocess
with open("inspect.json", "w") as out:   # what --json prints, against the doc's annotated example (below)
    subprocess.run(["dcp-safetensors", "inspect", "ckpt/step-1000", "--json"], stdout=out, check=True)
""",
    "convert runs/step-1000.distcp": """
import json
import os
import subprocess
import dcp_safetensors
from safetensors import safe_open
with open("convert.out", "w") as f:   # its output lines, against the doc's sample (in the test)
    f.write(sh_output)
index = json.load(open("export/step-1000/model.safetensors.index.json"))
assert "model.embed_tokens.weight" in index["weight_map"]
assert os.path.exists("export/step-1000/training_state/state.safetensors")
with safe_open("export/llama-bf16/model.safetensors", "pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
for path in ("export/step-1000", "export/llama-bf16", "s3://ckpt/step-1000", "restored/step-1000"):
    dcp_safetensors.verify(path)
assert sorted(os.listdir("restored/step-1000")) == sorted(os.listdir("export/step-1000"))
converted = [line for line in sh_output.splitlines() if line.startswith("converted ")]
assert len(converted) == 4, sh_output
with open("other.out", "w") as f:   # what verify says of another tool's checkpoint, against the doc's quotes
    subprocess.run(["dcp-safetensors", "verify", "models/llama", "--no-progress"], stdout=f, check=True)
""",
}

# Before the command holding the key: the damage its output shows.
CLI_BEFORE = {
    "# after damage": """
import os
os.truncate("ckpt/step-1000/training_state/state.safetensors", 256184)
with open("ckpt/step-1000/model-00001-of-00002.safetensors", "r+b") as f:
    f.seek(200_000)
    f.write(b"\\x00\\x01")
""",
}

CHECKS = {"user-guide.md": USER_GUIDE_CHECKS, "design.md": DESIGN_CHECKS, "cli.md": CLI_CHECKS}
BEFORE = {"cli.md": CLI_BEFORE}
SETUP = {"cli.md": CLI_SETUP}


def transcript(block: FencedBlock) -> list[tuple[str, list[str]]]:
    """``(command, output lines)`` of each ``$ command`` of a transcript block."""
    commands: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            commands[-1][1].append(line)
    return commands


def runnable(block: FencedBlock) -> bool:
    return block.info in ("python", "sh") or (block.info == "" and block.code.startswith("$ "))


def doc_items(doc: str) -> list[dict]:
    """What the runner runs for ``doc``: its blocks, in order, with the checks at their keys."""
    checks, before = CHECKS.get(doc, {}), BEFORE.get(doc, {})
    items: list[dict] = []
    if doc in SETUP:
        items.append({"kind": "setup", "line": 0, "code": SETUP[doc]})
    used: dict[str, int] = {}

    def keyed(table: dict[str, str], code: str, line: int) -> list[dict]:
        found = []
        for key, check in table.items():
            if key in code:
                used[key] = used.get(key, 0) + 1
                found.append({"kind": "check", "line": line, "code": check})
        return found

    for block in fenced_blocks(os.path.join(ROOT, "docs", doc)):
        if not runnable(block) or block.not_run is not None:
            continue
        if block.info == "":
            for command, output in transcript(block):
                line = block.line + block.code.splitlines().index("$ " + command)
                items += keyed(before, command, line)
                items.append({"kind": "command", "line": line, "code": command, "expected": output})
                items += keyed(checks, "$ " + command, line)
            continue
        first = block.code.splitlines()[0]
        if block.info == "python" and (m := TORCHRUN.match(first)):
            items.append({"kind": "torchrun", "line": block.line, "code": block.code,
                          "args": m.group(1).split(), "file": m.group(2)})
        else:
            items += keyed(before, block.code, block.line)
            items.append({"kind": block.info, "line": block.line, "code": block.code})
        items += keyed(checks, block.code, block.line)
    unmatched = {key: used.get(key, 0) for key in [*checks, *before] if used.get(key, 0) != 1}
    assert not unmatched, f"{doc}: each check's key must be in exactly one example: {unmatched}"
    return items


def test_every_example_runs_or_says_why_not():
    """Every code block of the docs is run, shown output, or marked ``not run`` with its reason; few are."""
    not_run = []
    for doc in DOCS:
        for block in fenced_blocks(os.path.join(ROOT, "docs", doc)):
            assert "\n```" not in "\n" + block.code, f"docs/{doc}:{block.line}: a fence inside a block (an unclosed one?)"
            assert block.info in ("python", "sh", "json", ""), f"docs/{doc}:{block.line}: ```{block.info}"
            if block.not_run is not None:
                assert runnable(block), f"docs/{doc}:{block.line}: 'not run' on a block that is not code"
                assert len(block.not_run) >= 10, f"docs/{doc}:{block.line}: say why the example is not run"
                not_run.append(f"{doc}:{block.line}")
    assert len(not_run) <= MAX_NOT_RUN, not_run
    assert sum(runnable(b) and b.not_run is None for doc in DOCS for b in fenced_blocks(os.path.join(ROOT, "docs", doc))) >= 15


def run_doc(doc: str, cwd, env: dict[str, str]) -> None:
    items = doc_items(doc)
    assert any(item["kind"] != "check" for item in items)
    (cwd / "items.json").write_text(json.dumps([f"docs/{doc}", items]))
    scripts = os.path.dirname(sys.executable)
    env = {**os.environ, **env, "PATH": scripts + os.pathsep + os.environ.get("PATH", ""), "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(cwd / "items.json")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-8000:]


@pytest.fixture
def s3_env(s3) -> dict[str, str]:
    """The AWS environment variables of the suite's moto server (through its proxy), with bucket ``bucket`` too."""
    try:
        s3.client.create_bucket(Bucket="bucket")
    except s3.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    endpoint = s3.storage_options["client_kwargs"]["endpoint_url"]
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT": endpoint}


@pytest.mark.parametrize("doc", [doc for doc in DOCS if any(runnable(b) and b.not_run is None
                                                             for b in fenced_blocks(os.path.join(ROOT, "docs", doc)))])
def test_the_doc_examples_run_as_written_and_do_what_they_say(doc, tmp_path, s3_env):
    run_doc(doc, tmp_path, s3_env)
    if doc == "cli.md":
        # The annotated `inspect --json` example: the same fields as the real output, at every level shown.
        blocks = fenced_blocks(os.path.join(ROOT, "docs", doc))
        (shown,) = [json.loads(re.sub(r"\s+//.*", "", b.code)) for b in blocks if b.info == "json"]
        real = json.loads((tmp_path / "inspect.json").read_text())
        assert set(shown) == set(real)
        for field in ("files", "tensors", "objects"):
            assert set(shown[field][0]) == set(real[field][0]), field
        assert set(shown["totals"]) == set(real["totals"])
        # The sample of a convert's output line: the same sentence, numbers and path aside.
        (sample,) = [b.code.strip() for b in blocks if b.info == "" and b.code.startswith("converted ")]
        aside = re.compile(r"\S*/\S*|[0-9a-f]{32}|\d+(\.\d+)?( [kMG]B\b)?")
        ran = (tmp_path / "convert.out").read_text().splitlines()
        assert aside.sub("#", sample) in {aside.sub("#", line) for line in ran}, ran
        # verify's verdict on a save_pretrained checkpoint, as the doc quotes it ("..." for any text).
        def counts(text: str) -> str:
            return re.sub(r"\d+ (tensor|file)s?\b", r"# \1", text)

        said = counts((tmp_path / "other.out").read_text().strip())
        quotes = re.findall(r"`(OK: [^`]*written by another tool[^`]*)`", open(os.path.join(ROOT, "docs", doc)).read())
        assert len(quotes) == 2
        for quote in quotes:
            assert re.fullmatch(".*".join(re.escape(counts(part)) for part in quote.split("...")), said), (quote, said)
