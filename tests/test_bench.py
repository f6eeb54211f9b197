"""The benchmark harness (experiments/bench.py) runs end to end at tiny sizes and writes every required number.

Only the shape of the output is checked: timing goals are the benchmark's business, not the tests'.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = {
    "ratios": ["cached_kd_step", "ckd_step_per_image", "online_kd_step", "gpd_step_vs_parts", "cache_fill_vs_teacher",
               "loop_vs_plain", "data_fill_vs_plain_loader", "data_train_vs_plain_loader"],
    "scale": [
        "gather_ms_batch256_fp16", "gather_ms_batch256_topk", "disk_gb_fp16", "disk_gb_topk", "train_rss_gb",
        "build_s_fp16", "build_s_topk", "compact_s_fp16", "open_s_fp16",
    ],
}


def _load_bench():
    spec = importlib.util.spec_from_file_location("lkd_bench", ROOT / "experiments" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _finite_positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bench_runs_at_tiny_sizes_and_reports_every_number(tmp_path, data_dir):
    bench = _load_bench()
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    bench.main([
        "--scale-rows", "5000", "--scale-classes", "100", "--scale-chunk", "2000", "--scale-dir", str(tmp_path),
        "--repeats", "2", "--warmup", "1", "--batch-size", "16", "--threads", "1",
        "--fill-samples", "48", "--fill-batch-size", "16", "--fill-repeats", "2",
        "--gathers", "10", "--gather-warmup", "2", "--rss-gathers", "10",
        "--extract-input", "32", "--extract-repeats", "1", "--remote-samples", "40", "--remote-batch", "20",
        "--data-samples", "40", "--data-batch", "20", "--data-workers", "0", "--data-repeats", "2",
        "--loop-epochs", "1", "--loop-repeats", "1", "--loop-warmup", "0", "--loop-budget", "128",
        "--loop-test-batches", "1", "--loop-cache-dir", str(tmp_path / "loop-cache"),
        "--json", str(json_path), "--md", str(md_path),
    ])
    result = json.loads(json_path.read_text())

    for key in ("cpu_model", "cpu_cores", "torch_version", "device_name"):
        assert result["machine"][key], key
    for section, keys in REQUIRED.items():
        bad = {k: result[section].get(k) for k in keys if not _finite_positive(result[section].get(k))}
        assert not bad, f"{section}: missing or not finite positive: {bad}"
    assert all(_finite_positive(v) for v in result["remote"]["fill_samples_per_s"].values())
    for key in ("extraction_s_resnet18", "expand_s_resnet18"):
        assert _finite_positive(result[key]), key
    for name, timing in result["timings_ms"].items():
        assert timing["n"] == 2 and _finite_positive(timing["median"]), name
    loop = result["loop"]
    for key in ("library_s", "plain_s", "library_epoch_s", "plain_epoch_s", "epoch_ratio", "ratio_extrapolated"):
        assert loop[key]["n"] == 1 and _finite_positive(loop[key]["median"]), key
    assert loop["config"]["steps_per_epoch"] == 2 and all(0 <= a <= 1 for a in loop["test_acc"]["library"])
    # the scale caches and the loop's checkpoints live under temporary folders that are removed at the end
    assert not list(tmp_path.glob("lkd-bench-scale-*")) and not list(tmp_path.glob("lkd-bench-loop-*"))

    table = md_path.read_text()
    for label in ("cached-KD step", "CKD step per image", "GPD step", "fill_cache", "gather batch 256",
                  "extract_student", "KD training run", "Training loop", "Data paths"):
        assert label in table
    assert "✓" in table or "✗" in table
