"""Tables, targets and plot from a benchmark suite JSON (``benchmarks/suite.py``).

    python benchmarks/report.py bench_out/suite.json                 # print the markdown
    python benchmarks/report.py bench_out/suite.json --update-docs   # rewrite docs + plot

``--update-docs`` replaces the text between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in docs/benchmarks.md (full tables, S3, targets) and in
README.md (one short table), and writes docs/img/bench.png.

Reads both formats of ``benchmarks/suite.py``'s JSON: runs before format 2
(``benchmarks/results/suite/2026-11-30-*.json``: 1-D FSDP2 on disk, medians
only) are shown as storage "disk", layout "fsdp", their minima taken from
``*_s_all``, their targets judged on medians as before; format 2 runs add
layout, storage, minima, moved bytes, and their targets compare the minima.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
MiB = 2**20

LABELS = {
    "ours": "**ours** (`SafetensorsWriter`/`Reader`)",
    "ours_unchecked": "ours, load with `verify_checksums=False`",
    "torch_hf": "torch `HuggingFaceStorageWriter` + consolidation / `HuggingFaceStorageReader`",
    "torch_distcp": "torch `FileSystemWriter`/`Reader` (.distcp, not HF)",
    "rank0": "gather to rank 0 + `save_file` / rank-0 `load_file` + broadcast",
    "limit": "limit: 1 process, sequential write + fsync / cold read",
}
SHORT = {"ours": "ours", "ours_unchecked": "ours, unchecked", "torch_hf": "torch HF+consol.", "torch_distcp": "torch .distcp",
         "rank0": "gather rank 0", "limit": "disk limit"}
COLORS = {"ours": "#d62728", "ours_unchecked": "#ff9896", "torch_hf": "#1f77b4", "torch_distcp": "#2ca02c", "rank0": "#9467bd", "limit": "#7f7f7f"}

# Issue 6's targets: (phase, peer method, minimum ours-speedup, only at this size or None).
RATIO_TARGETS = [
    ("save", "torch_hf", 2.0, None),
    ("save", "torch_distcp", 0.9, None),
    ("save", "limit", 0.8, 4.0),
    ("load", "torch_hf", 1.0, None),
    ("load", "torch_distcp", 0.9, None),
]
MEMORY_LIMIT = 256 * MiB


def config_label(cfg: dict, axes: bool = True) -> str:
    """``1 GiB fp32 x4`` (+ `` cuda``), then `` fsdp_tp tmpfs`` when the run has those axes and ``axes``."""
    gpu = " cuda" if cfg.get("device") == "cuda" else ""
    where = f" {cfg['layout']} {cfg['storage']}" if axes and "layout" in cfg else ""
    shards = cfg.get("max_shard_size", "5GB")
    files = "" if shards == "5GB" else f" max_shard_size={shards}"
    files += "" if cfg.get("min_files") is None else f" min_files={cfg['min_files']}"
    return f"{cfg['gib']:g} GiB {cfg['dtype']} x{cfg['world']}{gpu}{where}{files}"


def layout_of(cfg: dict) -> str:
    return cfg.get("layout", "fsdp")


def storage_of(cfg: dict) -> str:
    return cfg.get("storage", "disk")


def seconds_min(r: dict, phase: str) -> float:
    """The fastest round (format 2 stores it; older runs have every round's time)."""
    return r.get(f"{phase}_s_min", min(r.get(f"{phase}_s_all") or [r[f"{phase}_s"]]))


def speedup(r: dict, phase: str) -> float | None:
    """ours ÷ this method for targets: ratio of the minima in format-2 runs, of the medians before."""
    key = f"{phase}_ours_speedup_min"
    return r[key] if key in r else r.get(f"{phase}_ours_speedup")


def _mesh(r: dict) -> str:
    mesh = r.get("mesh")
    return " x ".join(f"{k} {v}" for k, v in mesh.items()) if mesh else ""


def _mb(n: float | None, digits: int = 0) -> str:
    return "-" if n is None else f"{n / 1e6:.{digits}f}"


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def targets(results: dict) -> list[dict]:
    """Issue 6's targets evaluated on one run: the worst configuration decides, per storage.

    Disk rows keep the targets' names; tmpfs rows (format 2) are judged apart, their names ending
    in `` [tmpfs]`` (the disk limit there is memory's).
    """
    runs = _ok(results["runs"])
    rows = []
    storages = sorted({storage_of(r["config"]) for r in runs}, key=lambda s: (s != "disk", s))
    for storage in storages or ["disk"]:
        suffix = "" if storage == "disk" else f" [{storage}]"
        for phase, peer, threshold, only_gib in RATIO_TARGETS:
            name = f"{phase}: ours >= {threshold}x {SHORT[peer]}" + (f" at {only_gib:g} GiB" if only_gib else "") + suffix
            pool = [r for r in runs if r["method"] == peer and storage_of(r["config"]) == storage
                    and speedup(r, phase) is not None]
            note = ""
            if only_gib is not None:
                sized = [r for r in pool if r["config"]["gib"] == only_gib]
                if not sized and pool:
                    largest = max(r["config"]["gib"] for r in pool)
                    sized = [r for r in pool if r["config"]["gib"] == largest]
                    note = f"{only_gib:g} GiB not run; shown at {largest:g} GiB"
                pool = sized
            if not pool:
                rows.append({"target": name, "threshold": threshold, "measured": None, "where": "", "status": "not run"})
                continue
            worst = min(pool, key=lambda r: speedup(r, phase))
            ratio = speedup(worst, phase)
            status = ("met" if ratio >= threshold else "missed") if not note else "not run (" + note + ")"
            spread = sorted(speedup(r, phase) for r in pool)
            basis = "minima" if f"{phase}_ours_speedup_min" in worst else "medians"
            rows.append({
                "target": name, "threshold": threshold, "measured": ratio,
                "where": f"worst of {len(pool)}: {config_label(worst['config'])}; range {spread[0]:.2f}-{spread[-1]:.2f}x"
                         + (" (ratio of the rounds' minima)" if basis == "minima" else ""),
                "status": status,
            })
    ours = [r for r in runs if r["method"] == "ours"]
    if ours:
        peaks = [(max(r[f"{p}_extra_rss_per_rank"]), p, r) for r in ours for p in ("save", "load")]
        peak, phase, where = max(peaks, key=lambda t: t[0])
        low = min(t[0] for t in peaks)
        rows.append({
            "target": "memory: ours' extra peak RSS on any rank <= 256 MiB", "threshold": MEMORY_LIMIT,
            "measured": peak,
            "where": f"max {peak / MiB:.0f} MiB ({phase}, {config_label(where['config'])}); "
                     f"range over {len(ours)} configurations {low / MiB:.0f}-{peak / MiB:.0f} MiB",
            "status": "met" if peak <= MEMORY_LIMIT else "missed",
        })
    s3 = {r["method"]: r for r in results.get("s3") or [] if "error" not in r}
    if "dcp_safetensors" in s3:
        ours_s3 = s3["dcp_safetensors"]
        up, kept = ours_s3["data_uploaded_bytes"], ours_s3["data_stored_bytes"]
        once = up == kept
        rows.append({
            "target": "S3: every checkpoint byte uploaded once", "threshold": 1.0,
            "measured": up / kept,
            "where": f"UploadPart {up / 1e6:.1f} MB for {kept / 1e6:.1f} MB of data files; all PUTs and parts "
                     f"{ours_s3['uploaded_bytes'] / 1e6:.3f} MB for {ours_s3['stored_bytes'] / 1e6:.3f} MB stored "
                     "(+ the commit record, deleted after the commit)",
            "status": "met" if once else "missed",
        })
        server = "SeaweedFS" if ours_s3.get("server", "moto") == "seaweed" else "moto"
        peers = {m: r for m, r in s3.items() if m != "dcp_safetensors"}
        for op in ("save", "load"):
            if peers:  # issue 18: at least 1.5x the best peer (bar 1.0x)
                best = min(peers, key=lambda m: peers[m][f"{op}_s"])
                ratio = peers[best][f"{op}_s"] / ours_s3[f"{op}_s"]
                rows.append({
                    "target": f"S3: {op} >= 1.0x the best peer (aim 1.5x)", "threshold": 1.0, "measured": ratio,
                    "where": f"{ours_s3['state_bytes'] / MiB:.0f} MiB, {server} on 127.0.0.1; best peer {best}",
                    "status": "met" if ratio >= 1.0 else "missed",
                })
    return rows


def _configs(runs: list[dict]) -> list[dict]:
    seen: list[dict] = []
    for r in runs:
        if r["config"] not in seen:
            seen.append(r["config"])
    return seen


def header(results: dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    label = f" **{meta['label']}**." if meta.get("label") else ""
    argv = shlex.join(meta.get("argv") or [])
    out = (
        f"Run of {meta['date']} on {m['host']}: {m['cores']} cores ({m['cpu']}), {m['memory_GiB']} GiB RAM{gpu}; "
        f"torch {m['torch']}, Python {m['python']}; suite wall time {meta['wall_s'] / 60:.1f} min.{label}\n\n"
        f"Command: `python benchmarks/suite.py {argv}`".rstrip() + "\n"
    )
    places = []
    for cfg in _configs(results["runs"]):
        if "storage" in cfg and (cfg["storage"], cfg.get("fs"), cfg.get("dir")) not in places:
            places.append((cfg["storage"], cfg.get("fs"), cfg.get("dir")))
    if places:
        out += "\nStorage: " + "; ".join(f"{s} = {fs} (`{d}`)" for s, fs, d in places) + ".\n"
    if meta.get("skipped"):
        out += "\nSkipped: " + "; ".join(meta["skipped"]) + ".\n"
    return out


def _groups(runs: list[dict]) -> list[tuple[str, str]]:
    """(storage, layout) in the order they first appear, disk first."""
    seen: list[tuple[str, str]] = []
    for r in runs:
        key = (storage_of(r["config"]), layout_of(r["config"]))
        if key not in seen:
            seen.append(key)
    return sorted(seen, key=lambda k: (k[0] != "disk", k[0]))


def _rounds_note(cfg: dict) -> str:
    n = cfg["repeats"]
    if "rounds_per_process" not in cfg:
        return f"median of {n} after 1 warm-up"
    per = cfg["rounds_per_process"]
    fresh = ("each in fresh processes after a warm-up, methods in alternating order" if per == 1
             else f"{per} per process set after its warm-up, set order alternating")
    return f"min and median of {n} round{'s' if n != 1 else ''}, {fresh}"


def _secs(r: dict | None, phase: str) -> str:
    """``min / median`` seconds of a run, ``error`` or ``-``."""
    if r is None or "error" in r:
        return "error" if r is not None else "-"
    return f"{seconds_min(r, phase):.2f} / {r[f'{phase}_s']:.2f}"


def _files(r: dict | None) -> str:
    """How many files of tensor data a run's save wrote (``-`` for runs from before it was counted)."""
    return "-" if r is None or r.get("data_files") is None else str(r["data_files"])


def _ratio(r: dict | None, ours: dict | None, phase: str) -> str:
    """``r``'s "ours ÷ method" on the minima / on the medians (older runs: minima from every round's time)."""
    if r is None or ours is None or "error" in r or "error" in ours or r.get(f"{phase}_ours_speedup") is None:
        return "-"
    low = r.get(f"{phase}_ours_speedup_min")
    if low is None:
        low = seconds_min(r, phase) / seconds_min(ours, phase)
    return f"{low:.2f}x / {r[f'{phase}_ours_speedup']:.2f}x"


def _side_by_side(runs: list[dict]) -> list[str]:
    """One row per configuration: ours next to torch's .distcp (min / median), moved and written bytes."""
    out = ["\n### Side by side: ours vs torch `.distcp`\n",
           "Seconds are min / median of the rounds; \"ours ÷ .distcp\" is .distcp's time over ours' "
           "(ours' throughput over .distcp's: above 1 ours is faster), on the minima / the medians. "
           "Moved: bytes ours' save plan sent between ranks (0 on POSIX: every rank writes its own bytes); "
           "written: bytes of the checkpoint's files.\n",
           "| storage | layout | mesh | world | dtype | size MB | data files ours / .distcp | save s ours | save s .distcp "
           "| ours ÷ .distcp, save | load s ours | load s .distcp | ours ÷ .distcp, load | moved between ranks MB "
           "| written MB | extra RSS ours save / load, max rank (MiB) | correct |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for storage, layout in _groups(runs):
        for cfg in _configs(runs):
            if (storage_of(cfg), layout_of(cfg)) != (storage, layout):
                continue
            rows = {r["method"]: r for r in runs if r["config"] == cfg}
            ours, peer = rows.get("ours"), rows.get("torch_distcp")
            if ours is None:
                continue
            bad = "error" in ours
            correct = "error" if bad else ("yes" if ours["correct"] and (peer is None or peer.get("correct", True))
                                           else "**NO**")
            out.append(
                f"| {storage} | {layout} | {'-' if bad else _mesh(ours) or '-'} | {cfg['world']} | {cfg['dtype']} "
                f"| {'-' if bad else _mb(ours['state_bytes'])} | {_files(ours)} / {_files(peer)} "
                f"| {_secs(ours, 'save')} | {_secs(peer, 'save')} "
                f"| {_ratio(peer, ours, 'save')} | {_secs(ours, 'load')} | {_secs(peer, 'load')} "
                f"| {_ratio(peer, ours, 'load')} "
                f"| {'-' if bad else _mb(ours.get('moved_between_ranks_bytes'), 1)} "
                f"| {'-' if bad else _mb(ours['bytes_on_disk'])} "
                f"| {'-' if bad else _mib(max(ours['save_extra_rss_per_rank']))} / "
                f"{'-' if bad else _mib(max(ours['load_extra_rss_per_rank']))} | {correct} |"
            )
    return out


def markdown(results: dict) -> str:
    out = [header(results)]
    runs = results["runs"]
    new = any("layout" in r["config"] for r in runs)
    if new and any(r["method"] == "ours" for r in runs):
        out.extend(_side_by_side(runs))
    for storage, layout in _groups(runs):
        if new:
            out.append(f"\n### {storage}, {layout}\n")
        for cfg in _configs(runs):
            if (storage_of(cfg), layout_of(cfg)) != (storage, layout):
                continue
            rows = [r for r in runs if r["config"] == cfg]
            ok = _ok(rows)
            size = f"{ok[0]['state_bytes'] / 1e6:.0f} MB" if ok else "?"
            mesh = next((_mesh(r) for r in ok if r.get("mesh")), "")
            mesh = f", mesh {mesh}" if mesh else ""
            level = "####" if new else "###"
            out.append(f"\n{level} {config_label(cfg)} ({size}, {cfg['device']}{mesh}, {_rounds_note(cfg)})\n")
            out.append("| method | save s min / median | save MB/s (median) | ours ÷ method, save (min / median) "
                       "| load s min / median | load MB/s (median) | ours ÷ method, load (min / median) "
                       "| extra RSS save: rank 0 / max other (MiB) | extra RSS load: rank 0 / max other (MiB) "
                       "| on disk MB | moved between ranks MB | block I/O written / read MB | correct |")
            out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                if "error" in r:
                    out.append(f"| {LABELS[r['method']]} | error: {r['error'].splitlines()[0][:120]} |" + " |" * 11)
                    continue

                ours = next((o for o in ok if o["method"] == "ours"), None)
                out.append(
                    f"| {LABELS[r['method']]} | {seconds_min(r, 'save'):.2f} / {r['save_s']:.2f} | {r['save_MBps']:.0f} "
                    f"| {_ratio(r, ours, 'save')} | {seconds_min(r, 'load'):.2f} / {r['load_s']:.2f} | {r['load_MBps']:.0f} "
                    f"| {_ratio(r, ours, 'load')} "
                    f"| {_mib(r['save_extra_rss_rank0'])} / {_mib(r['save_extra_rss_others_max'])} "
                    f"| {_mib(r['load_extra_rss_rank0'])} / {_mib(r['load_extra_rss_others_max'])} "
                    f"| {r['bytes_on_disk'] / 1e6:.0f} | {_mb(r.get('moved_between_ranks_bytes'), 1)} "
                    f"| {r['save_io_write_bytes'] / 1e6:.0f} / {r['load_io_read_bytes'] / 1e6:.0f} "
                    f"| {'yes' if r['correct'] else '**NO**'} |"
                )
    if results.get("s3"):
        server = "SeaweedFS" if results["s3"][0].get("server", "moto") == "seaweed" else "moto"
        rounds = len(results["s3"][0].get("save_s_all") or [1])
        out.append(f"\n### S3 ({server} on 127.0.0.1, 2 ranks, minimum of {rounds} timed round(s) in alternating "
                   "order after one untimed warm-up each; requests counted in one more round)\n")
        out.append("| method | save s | save MB/s | load s | load MB/s | requests (save + load) by operation | uploaded MB "
                   "| stored MB | moved between ranks MB | correct |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in results["s3"]:
            mb = r["state_bytes"] / 1e6
            ops = ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items()))
            out.append(f"| {r['method']} | {r['save_s']:.2f} | {mb / r['save_s']:.0f} | {r['load_s']:.2f} | {mb / r['load_s']:.0f} "
                       f"| {sum(r['requests'].values())} ({ops}) | {r['uploaded_bytes'] / 1e6:.1f} | {r['stored_bytes'] / 1e6:.1f} "
                       f"| {r.get('moved_between_ranks', 0) / 1e6:.1f} | {r['correct']} |")
    out.append("\n### Targets (issue 6)\n")
    out.append("\"ours ÷ method\" is ours' throughput over the method's (time of the method / time of ours), "
               "so every target reads \"at least\"."
               + (" Ratios of the rounds' minima; tmpfs configurations are judged apart." if new else "") + "\n")
    out.append("| target | measured | where | status |")
    out.append("|---|---|---|---|")
    for t in results.get("targets") or targets(results):
        measured = t["measured"]
        if measured is None:
            shown = "-"
        elif t["target"].startswith("memory"):
            shown = f"{measured / MiB:.0f} MiB"
        else:
            shown = f"{measured:.2f}x"
        out.append(f"| {t['target']} | {shown} | {t['where']} | {t['status']} |")
    return "\n".join(out) + "\n"


def readme_table(results: dict) -> str:
    """One configuration (the largest 1-D FSDP2 fp32 one on disk on the fewest ranks) in five columns, plus the plot."""
    runs = _ok(results["runs"])
    if not runs:
        return "No results.\n"
    cfg = max(_configs(runs), key=lambda c: (storage_of(c) == "disk", layout_of(c) == "fsdp", c["dtype"] == "fp32",
                                             -c["world"], c["gib"]))
    meta = results["meta"]
    label = f", {meta['label']}" if meta.get("label") else ""
    kind = {"fsdp": "FSDP2", "fsdp_tp": "FSDP2 x TP", "hsdp_tp": "HSDP x TP", "ep_tp": "EP x TP experts"}
    place = "local disk" if storage_of(cfg) == "disk" else storage_of(cfg)
    out = [f"{config_label(cfg, axes=False)} {kind.get(layout_of(cfg), layout_of(cfg))} state, {place}, "
           f"{meta['machine']['cores']}-core machine, "
           f"{meta['date']}{label} (`docs/benchmarks.md` has every size, the targets and S3):\n",
           "| method | save MB/s | load MB/s | peak extra RSS, any rank (save / load) | on disk |",
           "|---|---|---|---|---|"]
    for r in runs:
        if r["config"] != cfg:
            continue
        save = max(r["save_extra_rss_per_rank"])
        load = max(r["load_extra_rss_per_rank"])
        out.append(f"| {SHORT[r['method']] if r['method'] != 'ours' else '**dcp-safetensors**'} | {r['save_MBps']:.0f} "
                   f"| {r['load_MBps']:.0f} | +{_mib(save)} / +{_mib(load)} MiB | {r['bytes_on_disk'] / 1e9:.2f} GB |")
    out.append("\n![save/load throughput and peak memory per method](docs/img/bench.png)\n")
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _ok(results["runs"])
    configs = _configs(runs)
    methods = [m for m in LABELS if any(r["method"] == m for r in runs)]
    # Up to 12 configurations side by side (the 1-D matrix); more (layouts x storage) in three rows.
    wide = len(configs) > 12
    fig, axes = plt.subplots(3, 1, figsize=(max(15, 0.6 * len(configs)), 13)) if wide else \
        plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / max(1, len(methods))
    panels = [
        ("save throughput (MB/s)", lambda r: r["save_MBps"], False),
        ("load throughput (MB/s, cold cache on disk)", lambda r: r["load_MBps"], False),
        ("peak extra RSS, any rank, save or load (MiB; < 1 drawn at 1)",
         lambda r: max(1.0, max(r["save_extra_rss_per_rank"] + r["load_extra_rss_per_rank"]) / MiB), True),
    ]
    for ax, (title, value, log) in zip(axes, panels):
        for i, m in enumerate(methods):
            xs, ys = [], []
            for j, cfg in enumerate(configs):
                r = next((r for r in runs if r["method"] == m and r["config"] == cfg), None)
                if r is not None:
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    ys.append(value(r))
            ax.bar(xs, ys, width, label=SHORT[m], color=COLORS[m])
        if log:
            ax.set_yscale("log")
            ax.axhline(256, color="black", linestyle="--", linewidth=0.8)
            ax.text(-0.45, 256, "256 MiB target", ha="left", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([config_label(c) for c in configs], rotation=20, ha="right" if wide else "center",
                           fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(methods), fontsize=9, frameon=False)
    meta = results["meta"]
    label = f" - {meta['label']}" if meta.get("label") else ""
    fig.suptitle(f"dcp-safetensors vs peers, {meta['date']}, {meta['machine']['cores']} cores{label} "
                 "(median MB/s)", fontsize=11)
    fig.tight_layout(rect=(0, 0.03 if wide else 0.06, 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def replace_marked(path: str, text: str, marker: str = "bench") -> None:
    """Replace what lies between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` in ``path``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    with open(path) as f:
        doc = f.read()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path}: no {start} ... {end} section to rewrite")
    new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", doc, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


def update_docs(results: dict, root: str = ROOT) -> None:
    replace_marked(os.path.join(root, "docs", "benchmarks.md"),
                   markdown(results) + "\n![save/load throughput and peak memory per method](img/bench.png)\n")
    replace_marked(os.path.join(root, "README.md"), readme_table(results))
    plot(results, os.path.join(root, "docs", "img", "bench.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("json", help="output of benchmarks/suite.py")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    with open(args.json) as f:
        results = json.load(f)
    results["targets"] = targets(results)
    print(markdown(results))
    if args.update_docs:
        update_docs(results)


if __name__ == "__main__":
    main()
