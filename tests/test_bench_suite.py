"""The benchmark suite runs end to end at a tiny size, so it cannot rot silently (benchmarks/suite.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BENCH = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ours and .distcp, 2 gloo ranks, 4 MiB fp32 (16 layers of 256 x 256), one warm-up + one timed round."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "suite.json"
    cmd = [sys.executable, os.path.join(BENCH, "suite.py"), "--gib", "0.004", "--width", "256", "--dtype", "fp32",
           "--world", "2", "--methods", "ours", "torch_distcp", "--repeats", "1", "--no-s3", "--timeout-s", "60",
           "--dir", str(tmp / "ckpts"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_suite_json_has_every_field_and_correct_bytes(results: dict) -> None:
    assert results["meta"]["machine"]["cores"] >= 1
    assert [r["method"] for r in results["runs"]] == ["ours", "torch_distcp"]
    for r in results["runs"]:
        assert "error" not in r, r
        assert r["correct"] is True
        assert r["config"] == {"gib": 0.004, "dtype": "fp32", "world": 2, "device": "cpu", "width": 256,
                               "repeats": 1, "timeout_s": 60}
        assert r["state_bytes"] == 16 * 256 * 256 * 4
        assert r["save_s"] > 0 and r["load_s"] > 0
        assert r["save_MBps"] == pytest.approx(r["state_bytes"] / 1e6 / r["save_s"])
        assert len(r["save_extra_rss_per_rank"]) == len(r["load_extra_rss_per_rank"]) == 2
        assert r["save_extra_rss_rank0"] == r["save_extra_rss_per_rank"][0]
        assert r["load_extra_rss_others_max"] == r["load_extra_rss_per_rank"][1]
        assert r["bytes_on_disk"] >= r["state_bytes"]
        assert "save_io_write_bytes" in r and "load_io_read_bytes" in r
    ours, distcp = results["runs"]
    assert ours["save_ours_speedup"] == 1.0
    assert distcp["load_ours_speedup"] == pytest.approx(distcp["load_s"] / ours["load_s"])
    names = [t["target"] for t in results["targets"]]
    assert "save: ours >= 0.9x torch .distcp" in names
    assert any(n.startswith("memory:") for n in names)


def test_report_rewrites_only_the_marked_sections(results: dict, tmp_path) -> None:
    sys.path.insert(0, BENCH)
    import report

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
    assert "docs/img/bench.png" in (tmp_path / "README.md").read_text()


def test_plot_is_a_png(results: dict, tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra: pip install -e '.[bench]'")
    sys.path.insert(0, BENCH)
    import report

    report.plot(results, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
