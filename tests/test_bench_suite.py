"""The benchmark suite runs end to end at a tiny size, so it cannot rot silently (benchmarks/suite.py)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BENCH = os.path.join(ROOT, "benchmarks")
TINY = ["--gib", "0.004", "--width", "256", "--dtype", "fp32", "--methods", "ours", "torch_distcp", "--repeats", "1",
        "--no-s3", "--timeout-s", "60"]


def _suite(args: list[str], out: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, os.path.join(BENCH, "suite.py"), *TINY, *args, "--out", out],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out) as f:
        return json.load(f), done.stdout


def _report():
    sys.path.insert(0, BENCH)
    import report

    return report


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ours and .distcp, 1-D FSDP2 on 2 gloo ranks on disk, 4 MiB fp32 (16 layers of 256 x 256), warm-up + 1 round."""
    tmp = tmp_path_factory.mktemp("bench")
    return _suite(["--world", "2", "--dir", str(tmp / "ckpts")], str(tmp / "suite.json"))[0]


@pytest.fixture(scope="module")
def results_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """ours and .distcp, FSDP2 x TP on a (dp 2, tp 2) mesh of 4 gloo ranks, 4 MiB fp32 (4 Colwise/Rowwise pairs
    256 -> 512 -> 256), on tmpfs (/dev/shm) where there is one, in 1 MB files; world 2 is asked for too and skipped."""
    tmp = tmp_path_factory.mktemp("bench2d")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    ckpts = tempfile.mkdtemp(prefix="dcp-bench-test-", dir=shm or str(tmp))
    try:
        return _suite(["--world", "2", "4", "--layout", "fsdp_tp", "--max-shard-size", "1MB", "--dir", ckpts],
                      str(tmp / "suite.json"))
    finally:
        shutil.rmtree(ckpts, ignore_errors=True)


def test_suite_json_has_every_field_and_correct_bytes(results: dict) -> None:
    assert results["meta"]["machine"]["cores"] >= 1
    assert results["meta"]["format"] == 2
    assert [r["method"] for r in results["runs"]] == ["ours", "torch_distcp"]
    for r in results["runs"]:
        assert "error" not in r, r
        assert r["correct"] is True
        cfg = dict(r["config"])
        assert cfg.pop("dir").endswith("ckpts") and cfg.pop("fs")
        assert cfg == {"gib": 0.004, "dtype": "fp32", "world": 2, "device": "cpu", "width": 256, "repeats": 1,
                       "rounds_per_process": 1, "timeout_s": 60, "layout": "fsdp", "storage": "disk",
                       "max_shard_size": "5GB", "min_files": None}
        assert r["mesh"] == {"dp": 2}
        assert r["state_bytes"] == 16 * 256 * 256 * 4
        assert r["save_s"] > 0 and r["load_s"] > 0
        assert r["save_s_min"] == min(r["save_s_all"]) and r["load_s_min"] == min(r["load_s_all"])
        assert r["save_MBps"] == pytest.approx(r["state_bytes"] / 1e6 / r["save_s"])
        assert len(r["save_extra_rss_per_rank"]) == len(r["load_extra_rss_per_rank"]) == 2
        assert r["save_extra_rss_rank0"] == r["save_extra_rss_per_rank"][0]
        assert r["load_extra_rss_others_max"] == r["load_extra_rss_per_rank"][1]
        assert r["bytes_on_disk"] >= r["state_bytes"]
        assert "save_io_write_bytes" in r and "load_io_read_bytes" in r
    ours, distcp = results["runs"]
    assert ours["moved_between_ranks_bytes"] == 0  # POSIX: every rank writes its own bytes
    assert (ours["data_files"], distcp["data_files"]) == (1, 2)  # one HF file; .distcp: one per rank
    assert distcp["moved_between_ranks_bytes"] is None
    assert ours["save_ours_speedup"] == 1.0 and ours["save_ours_speedup_min"] == 1.0
    assert distcp["load_ours_speedup"] == pytest.approx(distcp["load_s"] / ours["load_s"])
    assert distcp["load_ours_speedup_min"] == pytest.approx(distcp["load_s_min"] / ours["load_s_min"])
    names = [t["target"] for t in results["targets"]]
    assert "save: ours >= 0.9x torch .distcp" in names
    assert any(n.startswith("memory:") for n in names)


def test_suite_runs_fsdp_over_tp_on_tmpfs_and_skips_what_does_not_fit(results_2d: tuple[dict, str]) -> None:
    results, stdout = results_2d
    assert "skipped: fsdp_tp at world 2" in stdout
    assert results["meta"]["skipped"] == [
        "fsdp_tp at world 2: fsdp_tp needs an even world of at least 4 ranks (a 2-D mesh, both dims >= 2)"]
    assert [r["method"] for r in results["runs"]] == ["ours", "torch_distcp"]
    for r in results["runs"]:
        assert "error" not in r, r
        assert r["correct"] is True
        assert r["config"]["layout"] == "fsdp_tp" and r["config"]["world"] == 4
        assert r["config"]["max_shard_size"] == "1MB"
        if r["config"]["dir"].startswith("/dev/shm/"):
            assert r["config"]["storage"] == "tmpfs"
        assert r["mesh"] == {"dp": 2, "tp": 2}
        assert r["state_bytes"] == 4 * (512 * 256 + 256 * 512) * 4
        assert len(r["save_extra_rss_per_rank"]) == 4
    # The 4 RowwiseParallel weights (256 x 512 fp32, columns halved over tp: 1 KiB runs) go through the row
    # exchange: each tp rank sends the other half of its columns, half of each weight in all.
    assert results["runs"][0]["moved_between_ranks_bytes"] == 4 * (256 * 512 * 4) // 2
    md = _report().markdown(results)
    storage = results["runs"][0]["config"]["storage"]
    assert f"| {storage} | fsdp_tp | dp 2 x tp 2 | 4 | fp32 | 4 |" in md
    # 1 MB files hold one 512 KiB weight each: ours writes 8 files, .distcp one per rank.
    assert f"| {storage} | fsdp_tp | dp 2 x tp 2 | 4 | fp32 | 4 | 8 / 4 |" in md
    assert "x4 fsdp_tp " + storage + " max_shard_size=1MB" in md
    assert f"### {storage}, fsdp_tp" in md and "Skipped: fsdp_tp at world 2" in md


def test_state_bytes_of_matches_every_layout() -> None:
    sys.path.insert(0, BENCH)
    import suite

    cfg = {"gib": 0.004, "dtype": "bf16", "width": 256, "world": 4}
    assert suite.state_bytes_of({**cfg, "layout": "fsdp"}) == 33 * 256 * 256 * 2  # round(32.8) layers
    assert suite.state_bytes_of({**cfg}) == suite.state_bytes_of({**cfg, "layout": "fsdp"})  # older configs
    for layout in ("fsdp_tp", "hsdp_tp"):  # 8 pairs of 256 x 512 + 512 x 256
        assert suite.state_bytes_of({**cfg, "layout": layout}) == 8 * 4 * 256 * 256 * 2
    # 8 experts per layer, each 256 -> 64 -> 256: 8 layers of 8 * 2 * 256 * 64 elements
    assert suite.state_bytes_of({**cfg, "layout": "ep_tp"}) == 8 * 8 * 2 * 256 * 64 * 2
    assert suite.mesh_of("hsdp_tp", 4) == ((2, 1, 2), ("replicate", "shard", "tp"))
    assert isinstance(suite.mesh_of("hsdp_tp", 6), str) and isinstance(suite.mesh_of("ep_tp", 2), str)


def test_method_order_alternates_round_by_round(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Fresh processes per round (the default): ours, .distcp; .distcp, ours; ours, .distcp (run_method faked)."""
    sys.path.insert(0, BENCH)
    import suite

    calls = []

    def fake(method: str, cfg: dict, root: str, rounds: int) -> dict:
        calls.append(method)
        phase = {"s": 1.0 + len(calls), "extra_rss": 0, "gpu_extra": 0, "io_read": 0, "io_write": 0}
        rd = {"save": phase, "load": phase, "bytes_on_disk": 8, "moved": 0 if method == "ours" else None,
              "correct": True}
        return {rank: {"state_bytes": 8, "rounds": [dict(rd) for _ in range(rounds)]} for rank in range(2)}

    monkeypatch.setattr(suite, "run_method", fake)
    cfg = {"gib": 1, "dtype": "fp32", "world": 4, "device": "cpu", "width": 8, "repeats": 3, "rounds_per_process": 1,
           "timeout_s": 1, "layout": "fsdp_tp", "storage": "disk", "fs": "ext4", "dir": str(tmp_path)}
    ours, distcp = suite.run_config(cfg, ["ours", "torch_distcp"], str(tmp_path), first=0)
    assert calls == ["ours", "torch_distcp", "torch_distcp", "ours", "ours", "torch_distcp"]
    assert ours["order"] == [0, 1, 0] and distcp["order"] == [1, 0, 1] and ours["process_set"] == [0, 1, 2]
    assert ours["save_s_all"] == [2.0, 5.0, 6.0] and ours["save_s_min"] == 2.0 and ours["save_s"] == 5.0
    calls.clear()
    suite.run_config({**cfg, "rounds_per_process": 3}, ["ours", "torch_distcp"], str(tmp_path), first=1)
    assert calls == ["torch_distcp", "ours"]  # one process set each; this configuration starts with the other
    assert suite.process_sets(3, 2) == [2, 1] and suite.process_sets(5, 1) == [1] * 5


def test_report_renders_the_results_of_older_runs() -> None:
    """benchmarks/results/suite holds runs from before layouts and storage (no "format" in their meta): they
    render, targets as they were; the newer runs render with the side-by-side table."""
    report = _report()
    files = sorted(glob.glob(os.path.join(BENCH, "results", "suite", "*.json")))
    runs = {path: json.loads(Path(path).read_text()) for path in files}
    older = {path: run for path, run in runs.items() if "format" not in run["meta"]}
    assert older and len(older) < len(runs)
    for path, run in runs.items():
        if path not in older:
            assert "Side by side" in report.markdown(run), path
    for old in older.values():
        md = report.markdown(old)
        assert "| **ours** (`SafetensorsWriter`/`Reader`) |" in md and "Side by side" not in md
        disk = [t for t in report.targets(old) if not t["target"].startswith("S3")]
        assert disk == [t for t in old["targets"] if not t["target"].startswith("S3")]
        assert "FSDP2 state, local disk" in report.readme_table(old)


def test_report_rewrites_only_the_marked_sections(results: dict, tmp_path) -> None:
    report = _report()
    for name in ("README.md", os.path.join("docs", "benchmarks.md")):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    report.replace_marked(str(tmp_path / "docs" / "benchmarks.md"), report.markdown(results))
    report.replace_marked(str(tmp_path / "README.md"), report.readme_table(results))
    doc = (tmp_path / "docs" / "benchmarks.md").read_text()
    before, _, after = doc.partition(report.START)
    original = open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    assert original.startswith(before) and original.endswith(after.partition(report.END)[2])
    assert "| **ours** (`SafetensorsWriter`/`Reader`) |" in doc and "| save: ours >= 0.9x torch .distcp |" in doc
    assert "| disk | fsdp | dp 2 | 2 | fp32 | 4 |" in doc
    readme = (tmp_path / "README.md").read_text()
    assert "docs/img/bench.png" in readme and "FSDP2 state, local disk" in readme


def test_plot_is_a_png(results: dict, results_2d: tuple[dict, str], tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra: pip install -e '.[bench]'")
    report = _report()
    both = {**results, "runs": results["runs"] + results_2d[0]["runs"]}
    report.plot(both, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_s3_client_bench_costs_each_client_per_byte_on_seaweedfs(tmp_path):
    """benchmarks/s3_clients.py at 32 MiB, 1 round: uploads and GETs through s3fs and botocore, each with
    its wall time and the client's and the server's CPU per MB."""
    out = tmp_path / "clients.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "s3_clients.py"), "--mib", "32", "--rounds", "1",
                           "--clients", "s3fs", "botocore", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert [r["client"] for r in results] == ["s3fs", "botocore"]
    for r in results:
        for op in ("upload_best", "get_best"):
            assert r[op]["mb_s"] > 0 and r[op]["client_ms_per_mb"] > 0 and r[op]["server_ms_per_mb"] > 0, r
    assert "| botocore |" in done.stdout


def test_s3_bench_on_seaweedfs_times_each_method_and_counts_its_requests(tmp_path):
    """benchmarks/s3.py end to end at 8 MiB, 1 round: ours and torch's FsspecWriter on SeaweedFS, each correct,
    with its requests counted in the extra round through the proxy (s3torchconnector is the bench extra's)."""
    out = tmp_path / "s3.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "s3.py"), "--mib", "8", "--rows", "512", "--rounds", "1",
                           "--methods", "dcp_safetensors", "torch_fsspec_distcp", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["dcp_safetensors", "torch_fsspec_distcp"]
    for r in results:
        assert r["server"] == "seaweed" and r["correct"] is True, r
        assert len(r["save_s_all"]) == 1 and r["save_s"] > 0 and r["load_s"] > 0
        assert r["data_stored_bytes"] >= 8 << 20 and sum(r["requests"].values()) > 0
    ours = results[0]
    assert ours["requests"]["UploadPart"] >= 1 and ours["data_uploaded_bytes"] == ours["data_stored_bytes"]
    assert "| dcp_safetensors |" in done.stdout


def test_crc_ceiling_times_copy_crc_and_both_in_each_process(tmp_path) -> None:
    """benchmarks/crc_ceiling.py (the tmpfs ceiling of a checked load, docs/benchmarks.md): one triple per
    process, each a real time, the copy-and-CRC run no shorter than its CRC alone."""
    sys.path.insert(0, BENCH)
    from crc_ceiling import ceiling

    results = ceiling(str(tmp_path), 4, 2, 1)
    assert len(results) == 2
    for copy, crc, both in results:
        assert 0 < copy and 0 < crc < both, (copy, crc, both)
    assert not list(tmp_path.iterdir())  # its files removed
