"""``dcp-safetensors convert``: .distcp -> HF, HF -> HF (re-shard, cast), local <-> S3, bounded memory."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from cli_cases import NON_TENSORS, no_dist, run_cli, s3_cli_args, save_fsdp2_distcp
from safetensors import safe_open

from dcp_safetensors import SafetensorsReader, SafetensorsWriter, read_checkpoint, verify
from dcp_safetensors.cli import main
from dcp_safetensors.convert import convert
from dcp_safetensors.names import BLOCKS_FILE
from dcp_safetensors.sources import PIECE

MB = 10**6


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def hf_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the HF files, read with ``safetensors.torch.load_file`` (what transformers uses)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        loaded = safetensors.torch.load_file(str(path / file))
        assert not set(loaded) & set(out)
        out.update(loaded)
    assert set(out) == set(index["weight_map"])
    return out


def test_fsdp2_distcp_converts_to_hf_files_and_training_state(ranks, tmp_path):
    src, dst = tmp_path / "distcp", tmp_path / "hf"
    full = ranks(2).run(save_fsdp2_distcp, str(src))[0]
    assert any(p.suffix == ".distcp" for p in src.iterdir())
    out = run_cli("convert", src, dst, "--model-prefix", "model", "--max-shard-size", "1kB", "--no-progress")
    assert "converted" in out.stdout and str(dst) in out.stdout

    model = {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model) and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(dst / file), "pt") as f:
            assert same(f.get_tensor(name), model[name]), name
    loaded = hf_tensors(dst)
    assert all(same(loaded[k], model[k]) for k in model)
    assert loaded["head.weight"].dtype == torch.bfloat16 and loaded["positions"].dtype == torch.int64

    optim = {k: v for k, v in full.items() if not k.startswith("model.")}
    assert optim and all(k.startswith("optim.state.") for k in optim)
    extra = index["metadata"]["dcp_safetensors"]["extra_weight_map"]
    assert set(extra) == set(optim) and all(f.startswith("training_state/state-") for f in extra.values())
    state = {}
    for file in set(extra.values()):
        state.update(safetensors.torch.load_file(str(dst / file)))
    assert set(state) == set(optim) and all(same(state[k], optim[k]) for k in optim)
    verify(str(dst))

    # Non-tensor values come back with their types through SafetensorsReader.
    target = {
        "model": {k: torch.zeros_like(v) for k, v in model.items()},
        "step": 0,
        "cfg": {"lr": 1.0, "warmup": 9, "decay": 1.0, "on": True, "name": ""},
        "betas": (0.0, 0.0),
    }
    no_dist(dcp.load, target, storage_reader=SafetensorsReader(str(dst)))
    assert target["step"] == 7 and type(target["step"]) is int
    assert target["cfg"] == NON_TENSORS["cfg"]
    assert {k: type(v) for k, v in target["cfg"].items()} == {k: type(v) for k, v in NON_TENSORS["cfg"].items()}
    assert target["betas"] == (0.9, 0.999) and type(target["betas"]) is tuple
    assert all(same(target["model"][k], model[k]) for k in model)


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "embed.weight": torch.randn(40, 16, generator=g),
            "layers.0.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
            "layers.10.weight": torch.randn(16, 16, generator=g).to(torch.float16),
            "layers.2.bias": torch.randn(16, generator=g).double(),
            "positions": torch.arange(7),
            "mask": torch.rand(3, 5, generator=g) > 0.5,
            "scale": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
        },
        "optim": {"embed.weight.exp_avg": torch.randn(40, 16, generator=g), "step": torch.tensor(3.0)},
        "step": 3,
        "cfg": {"lr": 0.001, "on": False},
    }


def test_nested_distcp_without_a_prefix_detects_the_model_and_casts_only_its_weights(tmp_path):
    """dcp.save({"model": ..., "optim": ...}) converted with no --model-prefix: the HF files hold the model's
    weights alone, and --dtype bf16 leaves the optimizer's moments and step counter as they were."""
    state = _state()
    no_dist(dcp.save, state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "distcp")))
    dst = tmp_path / "hf"
    out = run_cli("convert", tmp_path / "distcp", dst, "--dtype", "bf16", "--max-shard-size", "1kB", "--no-progress")

    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state["model"])
    weights = hf_tensors(dst)
    for key, t in state["model"].items():
        want = torch.bfloat16 if t.is_floating_point() else t.dtype
        assert weights[key].dtype == want and torch.equal(weights[key], t.to(want)), key
    extra = index["metadata"]["dcp_safetensors"]["extra_weight_map"]
    assert set(extra) == {"optim.embed.weight.exp_avg", "optim.step"}
    kept = {}
    for file in set(extra.values()):
        kept.update(safetensors.torch.load_file(str(dst / file)))
    for key, t in state["optim"].items():
        assert kept["optim." + key].dtype == torch.float32 and torch.equal(kept["optim." + key], t), key

    weight_files = len(set(index["weight_map"].values()))
    state_files = len(set(extra.values()))
    assert weight_files > 1 and state_files >= 1
    assert f"into {weight_files} weight files and {state_files} training-state file" in out.stdout, out.stdout
    assert "model prefix 'model' detected" in out.stdout


def test_optimizer_state_without_a_model_group_asks_for_the_prefix(tmp_path):
    state = {"net": {"w": torch.ones(4)}, "opt": {"state.w.exp_avg": torch.zeros(4)}}
    no_dist(dcp.save, state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "distcp")))
    p = run_cli("convert", tmp_path / "distcp", tmp_path / "hf", "--no-progress", rc=1)
    assert "holds optimizer state (e.g. 'opt.state.w.exp_avg')" in p.stderr and "net, opt" in p.stderr
    assert "--model-prefix" in p.stderr and not (tmp_path / "hf").exists()
    run_cli("convert", tmp_path / "distcp", tmp_path / "hf", "--model-prefix", "net", "--no-progress")
    assert set(hf_tensors(tmp_path / "hf")) == {"w"}


def test_distcp_conversion_writes_the_same_bytes_as_the_writer(tmp_path):
    """Converting a .distcp save gives the files SafetensorsWriter writes for the same state, but the snapshot id."""
    state = _state()
    no_dist(dcp.save, state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "distcp")))
    no_dist(dcp.save, state, storage_writer=SafetensorsWriter(str(tmp_path / "w"), model_prefix="model", max_shard_size=2000))
    result = convert(str(tmp_path / "distcp"), str(tmp_path / "c"), model_prefix="model", max_shard_size=2000)
    written, converted = read_checkpoint(str(tmp_path / "w")), read_checkpoint(str(tmp_path / "c"))
    assert result.snapshot == converted.snapshot != written.snapshot

    def files(root, snapshot: str) -> dict[str, bytes]:
        out = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                out[os.path.relpath(p, root)] = open(p, "rb").read().replace(snapshot.encode(), b"S" * 32)
        return out

    assert verify(str(tmp_path / "w")).checksums and verify(str(tmp_path / "c")).checksums
    a, b = files(tmp_path / "w", written.snapshot), files(tmp_path / "c", converted.snapshot)
    assert sorted(a) == sorted(b) and len(a) > 4
    for name in a:
        if name == "model.safetensors.index.json":
            ia, ib = json.loads(a[name]), json.loads(b[name])
            for idx in (ia, ib):
                # Blocks are cut at each writer's chunk rows: the 2-rank save's differ from convert's.
                idx["metadata"]["dcp_safetensors"].pop("block_checksums")
                for f in idx["metadata"]["dcp_safetensors"]["files"].values():
                    f["checksum"] = f["blocks"] = "-"
            assert ia == ib
        elif name == BLOCKS_FILE:
            continue  # each checked against its files by verify, above
        else:
            assert a[name] == b[name], name


def test_hf_to_hf_reshards_and_casts_floats_only(tmp_path):
    from huggingface_hub import save_torch_state_dict

    g = torch.Generator().manual_seed(1)
    tensors = {
        "big.f32": torch.randn(PIECE // 4 + 1000, generator=g),  # more than one read/cast piece
        "w.f16": torch.randn(30, 7, generator=g).half(),
        "w.f64": torch.randn(9, generator=g).double(),
        "w.bf16": torch.randn(5, 5, generator=g).bfloat16(),
        "ids.i64": torch.randint(-(2**40), 2**40, (11,), generator=g),
        "ids.i32": torch.randint(-100, 100, (4, 3), generator=g, dtype=torch.int32),
        "mask.bool": torch.rand(6, generator=g) > 0.5,
        "raw.u8": torch.randint(0, 255, (10,), generator=g, dtype=torch.uint8),
        "q.f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(1.5),
        "none": torch.zeros(0, 3),
    }
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    save_torch_state_dict(tensors, str(src), max_shard_size="100KB")
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    assert (src / "model.safetensors.index.json").exists()

    out = run_cli("-v", "convert", src, dst, "--max-shard-size", "5MB", "--dtype", "bf16")
    assert "dcp_safetensors: planned" in out.stderr  # -v: INFO of our logger
    assert "B/s" in out.stderr  # the progress bar
    loaded = hf_tensors(dst)
    assert len(set(json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"].values())) == 2
    for key, t in tensors.items():
        cast = t.dtype in (torch.float32, torch.float16, torch.float64, torch.bfloat16)
        assert same(loaded[key], t.to(torch.bfloat16) if cast else t), key
    assert json.loads((dst / "config.json").read_text()) == {"model_type": "toy", "torch_dtype": "bfloat16"}
    verify(str(dst))
    # Back to one file, no cast: the same bytes again.
    assert main(["convert", str(dst), str(tmp_path / "one"), "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir() if p.suffix == ".safetensors"] == ["model.safetensors"]
    again = safetensors.torch.load_file(str(tmp_path / "one" / "model.safetensors"))
    assert all(same(again[k], loaded[k]) for k in loaded)


def test_local_to_s3_and_s3_to_local(s3, tmp_path):
    state = _state()
    state["model"]["big"] = torch.randn(3 * (1 << 20))  # 12 MiB: several files of several MB
    no_dist(dcp.save, state, storage_writer=SafetensorsWriter(str(tmp_path / "src"), model_prefix="model"))
    url = s3.url(s3.prefix)
    run_cli("convert", tmp_path / "src", url, "--max-shard-size", "6MB", "--no-progress", *s3_cli_args(s3))
    keys = s3.keys(s3.prefix)
    assert "model.safetensors.index.json" in keys and "training_state/objects.json" in keys
    assert "training_state/state.safetensors" in keys and len([k for k in keys if k.startswith("model-")]) == 2
    assert not s3.open_uploads(s3.prefix)
    assert s3.proxy.stats.requests["UploadPart"] >= 3
    verify(url, storage_options=s3.storage_options)

    # The other direction in-process (same main(); a second subprocess would only add start-up time).
    assert main(["convert", url, str(tmp_path / "back"), "--dtype", "fp16", "--no-progress", *s3_cli_args(s3)]) == 0
    back = read_checkpoint(str(tmp_path / "back"))
    assert back.model_prefix == "model" and back.objects == {"step": 3, "cfg.lr": 0.001, "cfg.on": False}
    loaded = hf_tensors(tmp_path / "back")
    for k, t in state["model"].items():
        assert same(loaded[k], t.half() if t.is_floating_point() else t), k
    ts = safetensors.torch.load_file(str(tmp_path / "back" / "training_state" / "state.safetensors"))
    assert same(ts["optim.embed.weight.exp_avg"], state["optim"]["embed.weight.exp_avg"])  # training state: not cast


# VmHWM, not ru_maxrss: Linux carries a forked child's maxrss (the parent's RSS) across exec.
def test_tied_keys_stay_tied(tmp_path, capsys):
    from dcp_safetensors.planner import SafetensorsSavePlanner

    shared = torch.arange(6.0)
    state = {"model": {"embed.weight": shared, "mid": torch.ones(2), "lm_head.weight": shared}, "step": 1}
    writer = SafetensorsWriter(str(tmp_path / "src"), model_prefix="model")
    no_dist(dcp.save, state, storage_writer=writer, planner=SafetensorsSavePlanner())
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "fp16", "--no-progress"]) == 0
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["embed.weight", "mid"]
    assert index["metadata"]["dcp_safetensors"]["aliases"] == {"lm_head.weight": "embed.weight"}
    target = {"model": {"embed.weight": torch.zeros(6), "mid": torch.zeros(2), "lm_head.weight": torch.zeros(6)}}
    no_dist(dcp.load, target, storage_reader=SafetensorsReader(str(tmp_path / "dst")))
    assert target["model"]["lm_head.weight"].tolist() == shared.tolist()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "dst"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["aliases"] == [{"key": "model.lm_head.weight", "same_as": "model.embed.weight"}]
    assert [t["key"] for t in doc["tensors"]] == ["model.embed.weight", "model.mid"]
    assert main(["inspect", str(tmp_path / "dst")]) == 0
    assert "TIED KEY" in capsys.readouterr().out


MEASURE = r"""
import re, sys
import dcp_safetensors.cli, dcp_safetensors.convert, tqdm, safetensors
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
# The first argv is a warm-up on a tiny checkpoint: lazy imports and thread pools are not
# the conversion's memory. Then the high-water mark is reset (clear_refs 5) and measured.
for i, argv in enumerate(sys.argv[1:]):
    if i == 1:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
    rc = dcp_safetensors.cli.main(argv.split("|"))
    assert rc == 0, argv
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures VmHWM of /proc/self/status")
def test_conversion_memory_stays_bounded(tmp_path):
    """~400 MB in 40 tensors: peak RSS growth of the converting process is a fraction of it.

    The growth is bounded by the tensors in flight (read threads x a tensor),
    not by the checkpoint: ~80 MB here, whatever the number of tensors.
    """
    g = torch.Generator().manual_seed(2)
    state = {f"layers.{i}.weight": torch.randn(2500, 1000, generator=g) for i in range(40)}
    size = sum(t.numel() * t.element_size() for t in state.values())
    no_dist(dcp.save, state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "distcp")))
    del state
    no_dist(dcp.save, {"w": torch.ones(1000)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "tiny")))
    runs = [
        f"convert|{tmp_path / 'tiny'}|{tmp_path / 'tiny_hf'}|--no-progress",
        f"convert|{tmp_path / 'distcp'}|{tmp_path / 'hf'}|--max-shard-size|100MB|--no-progress",
        f"convert|{tmp_path / 'hf'}|{tmp_path / 'bf16'}|--dtype|bf16|--no-progress",
    ]
    p = subprocess.run([sys.executable, "-c", MEASURE, *runs], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    growth = int(p.stdout.split()[-1])
    print(f"convert peak RSS growth: {growth / MB:.0f} MB for a {size / MB:.0f} MB checkpoint")
    assert growth < 0.35 * size, f"peak RSS grew {growth / MB:.0f} MB converting {size / MB:.0f} MB"
    verify(str(tmp_path / "bf16"))
    assert len([n for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors")]) == 4


# --- errors ------------------------------------------------------------------------------------


def test_missing_source_is_one_line_on_stderr_and_exit_1(tmp_path):
    p = run_cli("convert", tmp_path / "nope", tmp_path / "dst", rc=1, fresh=True)  # the installed script, from its first line
    assert p.stderr.startswith("error: CheckpointNotFoundError:") and "nope" in p.stderr
    assert not (tmp_path / "dst").exists() or not os.listdir(tmp_path / "dst")


def test_failed_conversion_keeps_the_previous_checkpoint(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    no_dist(dcp.save, _state(), storage_writer=SafetensorsWriter(str(src), max_shard_size=1000))
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-3])
    assert main(["convert", str(src), str(dst), "--dtype", "fp32"]) == 1
    err = capsys.readouterr().err
    assert "FileSizeMismatchError" in err and victim.name in err
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before  # no staging left, nothing changed


def _fail_on_third_tensor(monkeypatch) -> None:
    import dcp_safetensors.convert as module

    real, calls = module._cast_pieces, []

    def failing(pieces, src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (injected)")
        return real(pieces, src, dst)

    monkeypatch.setattr(module, "_cast_pieces", failing)


def test_failure_while_streaming_aborts_the_save(tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    no_dist(dcp.save, _state(), storage_writer=SafetensorsWriter(str(src), max_shard_size=1000))
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    _fail_on_third_tensor(monkeypatch)
    assert main(["convert", str(src), str(dst), "--max-shard-size", "5GB", "--no-progress"]) == 1
    assert "No space left on device (injected)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before


def test_failure_while_streaming_to_s3_aborts_every_upload(s3, tmp_path, capsys, monkeypatch):
    no_dist(dcp.save, _state(), storage_writer=SafetensorsWriter(str(tmp_path / "src"), max_shard_size=1000))
    _fail_on_third_tensor(monkeypatch)
    url = s3.url(s3.prefix)
    assert main(["convert", str(tmp_path / "src"), url, "--max-shard-size", "1000", "--no-progress", *s3_cli_args(s3)]) == 1
    assert "injected" in capsys.readouterr().err
    assert s3.proxy.stats.requests["CreateMultipartUpload"] > 1 and s3.proxy.stats.requests["AbortMultipartUpload"] > 1
    assert not s3.open_uploads(s3.prefix) and not s3.keys(s3.prefix)


def test_bad_options_are_reported(tmp_path, capsys):
    no_dist(dcp.save, {"w": torch.ones(2)}, storage_writer=SafetensorsWriter(str(tmp_path / "src")))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "d"), "--max-shard-size", "5 gigs"]) == 1
    assert "max_shard_size '5 gigs'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "d"), "--storage-option", "novalue"]) == 1
    assert "expected key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp_path / "src"), str(tmp_path / "d"), "--dtype", "int8"])
    assert info.value.code == 2


class Unpicklable:
    """Stored by torch.save; torch.load(weights_only=True) refuses it."""


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_distcp_source_runs_no_code(tmp_path, capsys):
    src = tmp_path / "distcp"
    no_dist(dcp.save, {"w": torch.ones(2), "custom": Unpicklable()}, storage_writer=dcp.FileSystemWriter(str(src)))
    assert main(["convert", str(src), str(tmp_path / "d"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "ConversionError" in err and "'custom'" in err and "weights_only" in err

    marker = tmp_path / "pwned"
    (src / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    assert main(["convert", str(src), str(tmp_path / "d"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "mkdir" in err and ".metadata" in err
    assert not marker.exists()
