"""The goals and the markdown report of a benchmark result."""

from __future__ import annotations

from collections.abc import Callable

# name -> (goal, comparison); a ratio "meets" its goal when its median does.
GOALS: dict[str, tuple[float, str]] = {
    "cached_kd_step": (1.05, "<="),
    "ckd_step_per_image": (1.10, "<="),
    "gpd_step_vs_parts": (1.15, "<="),
    "cache_fill_vs_teacher": (0.9, ">="),
    "gather_ms_batch256_fp16": (2.0, "<="),
    "gather_ms_batch256_topk": (2.0, "<="),
    "extraction_s_resnet18": (1.0, "<"),
    "latency50ms_4_vs_1_in_flight": (3.0, ">="),
    "data_fill_vs_plain_loader": (0.9, ">="),
    "data_train_vs_plain_loader": (0.9, ">="),
    "loop_vs_plain": (1.10, "<="),
}


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _goal_cells(name: str, value: float) -> tuple[str, str]:
    if name not in GOALS:
        return "", ""
    goal, op = GOALS[name]
    ok = {"<=": value <= goal, ">=": value >= goal, "<": value < goal}[op]
    return f"{op.replace('<=', '≤').replace('>=', '≥')} {goal:g}", "✓" if ok else "✗"


RATIO_LABELS = {
    "cached_kd_step": "cached-KD step / CE step",
    "ckd_step_per_image": "CKD step per image / CE step per image",
    "online_kd_step": "online KD (teacher in the loop) step / CE step",
    "gpd_step_vs_parts": "GPD step / (wide CE step + student CE step)",
    "cache_fill_vs_teacher": "fill_cache samples/s / bare teacher samples/s",
    "data_fill_vs_plain_loader": "ImageFolder fill data path / plain DataLoader(ImageFolder), images/s",
    "data_train_vs_plain_loader": "ImageFolder training data path / plain DataLoader(ImageFolder), images/s",
    "loop_vs_plain": "KD training run (Trainer, checkpoints, test) / plain PyTorch loop, wall time",
}


def _row(label: str, stats: dict, name: str = "", digits: int = 3) -> str:
    goal, ok = _goal_cells(name, stats["median"])
    q = f"{stats['q1']:.{digits}f}–{stats['q3']:.{digits}f}"
    return f"| {label} | {stats['median']:.{digits}f} | {q} | {goal} | {ok} |"


def _headline_rows(result: dict) -> list[str]:
    """Every ratio and goal: ratios, gathers, extraction."""
    rows = [_row(label, result["ratio_summaries"][name], name)
            for name, label in RATIO_LABELS.items() if name in result["ratio_summaries"]]
    sc = result.get("scale", {})
    for name in ("fp16", "topk"):
        key = f"gather_ms_batch256_{name}"
        if key in sc:
            rows.append(_row(f"gather, batch 256, {name}, ms", sc[f"{key}_summary"], key))
    if "extraction" in result:
        e = result["extraction"]
        rows.append(_row(f"extract_student, {e['model']} ratio {e['ratio']:g}, s", e["extract"],
                         "extraction_s_resnet18"))
        rows.append(f"| expand, {e['model']} ratio {e['ratio']:g} (example input {e['example_input']}²), s | "
                    f"{e['expand_s']:.3f} | | | |")
    return rows


def _remote_rows(r: dict) -> list[str]:
    """Section 4: the budgeted fill through RemoteTeacher (one measurement each, samples/s)."""
    sps, ratios = r["fill_samples_per_s"], r["ratios"]
    rows = ["", f"Remote teacher: fill_cache samples/s over {r['config']['n']} CIFAR-10 samples, batch "
            f"{r['config']['batch']} (client and local server on the same cores; "
            "`experiments/benchmarks/remote.py`)", "",
            "| fill through | samples/s | vs in-process | goal | |", "|---|---|---|---|---|",
            f"| in-process shared teacher | {sps['in_process']:.0f} | 1 | | |"]
    for codec in ("json", "npy"):
        rows.append(f"| RemoteTeacher, {codec}, 1 in flight | {sps[f'remote_{codec}']:.0f} | "
                    f"{ratios[f'remote_{codec}_vs_in_process']:.3f} | | |")
    name = "latency50ms_4_vs_1_in_flight"
    goal, ok = _goal_cells(name, ratios[name])
    rows.append(f"| server + 50 ms latency: 1 / 4 in flight | {sps['latency50ms_1_in_flight']:.0f} / "
                f"{sps['latency50ms_4_in_flight']:.0f} | 4 vs 1: {ratios[name]:.2f} | {goal} | {ok} |")
    return rows


def _data_rows(d: dict) -> list[str]:
    """Section 7: images/s of the fill's and the training loop's data paths vs a plain DataLoader(ImageFolder)."""
    c = d["setup"]
    rows = ["", f"Data paths: {c['samples']} images of an ImageFolder ({c['teacher_size']}-px teacher view, "
            f"{c['student_size']}-px student view), batch {c['batch_size']}, {c['num_workers']} workers, "
            f"{c['repeats']} interleaved repeats; load average at the end {c.get('loadavg_end')}; CPU = process + "
            "DataLoader workers (steadier than wall time on a shared machine); `experiments/benchmarks/data.py`", "",
            "| data path | images/s | plain loader, images/s | / plain, wall (IQR) | / plain, CPU (IQR) | goal | |",
            "|---|---|---|---|---|---|---|"]
    for key, label, name in (("fill", "fill (seeded teacher view, claims, durable blocks)",
                              "data_fill_vs_plain_loader"),
                             ("train", "training (student view + cached outputs)", "data_train_vs_plain_loader")):
        r = d[key]
        x, goal = r["ratio"], _goal_cells(name, r["ratio"]["median"])
        cpu = r["cpu"]["ratio"] if "cpu" in r else None
        cpu_cell = f"{cpu['median']:.3f} ({cpu['q1']:.3f}–{cpu['q3']:.3f})" if cpu else ""
        rows.append(f"| {label} | {r['images_per_s']['median']:.0f} | {r['plain_images_per_s']['median']:.0f} | "
                    f"{x['median']:.3f} ({x['q1']:.3f}–{x['q3']:.3f}) | {cpu_cell} | {goal[0]} | {goal[1]} |")
    return rows


def _scale_rows(sc: dict) -> list[str]:
    if "skipped" in sc:
        return ["", f"Scale: skipped ({sc['skipped']})."]
    rows = ["", f"Scale: {sc['rows']:,} x {sc['classes']:,} synthetic cache, written in chunks of "
            f"{sc['chunk_rows']:,} rows",
            "", "| | fp16 | top-k |", "|---|---|---|"]

    def line(label: str, fmt: str, key: Callable[[str], object]) -> None:
        cells = []
        for name in ("fp16", "topk"):
            value = key(name)
            cells.append("n/a" if value is None else format(value, fmt))
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")

    line("size on disk, GB", ".3f", lambda n: sc[f"disk_gb_{n}"])
    line("build (TeacherCache.write), s", ".1f", lambda n: sc[f"build_s_{n}"])
    line("blocks written (one per write)", "d", lambda n: sc[f"segments_{n}"])
    line("writer RSS growth while building, GB", ".3f", lambda n: sc[f"build_rss_gb_{n}"])
    line("compact, s", ".1f", lambda n: sc[f"compact_s_{n}"])
    line("compact peak RSS above start, GB", ".3f", lambda n: sc[f"compact_peak_rss_gb_{n}"])
    line("open (crc32 verification of every chunk), s", ".2f", lambda n: sc[f"open_s_{n}"])
    line("gather batch 256 before compaction, ms", ".3f", lambda n: sc[f"gather_ms_batch256_{n}_uncompacted"])
    line("gather batch 256, ms", ".3f", lambda n: sc[f"gather_ms_batch256_{n}"])
    line("training process: peak RSS, GB", ".3f", lambda n: sc[f"train_rss_{n}"]["peak_gb"])
    line("training process: baseline RSS (torch imported), GB", ".3f", lambda n: sc[f"train_rss_{n}"]["baseline_gb"])
    line("training process: anonymous / file-backed RSS (clean page-cache pages, reclaimable), GB", "", lambda n: (
        f"{sc[f'train_rss_{n}']['anon_gb']:.3f} / {sc[f'train_rss_{n}']['file_gb']:.3f}"
        if sc[f"train_rss_{n}"].get("anon_gb") is not None else None))
    return rows


def _loop_rows(r: dict) -> list[str]:
    """Section 9: the library's KD run vs the plain loop, whole runs and their per-epoch / fixed parts (s)."""
    c = r["config"]
    rows = ["", f"Training loop: {c['epochs']} epochs of {c['steps_per_epoch']} steps (budget {c['budget']}, batch "
            f"{c['batch_size']}, {c['val_samples']} validation samples), {c['repeats']} alternating repeats, "
            f"{c['threads']} thread(s); fixed = run − epochs × median epoch (start-up, fit / test set-up, test); "
            f"same test accuracy in both: {r.get('same_test_acc')}; `experiments/benchmarks/loop.py`", "",
            "| | library | plain loop | library / plain (IQR) |", "|---|---|---|---|"]
    for label, key, ratio in (("run, s", "s", "ratio"),
                              ("epoch (train + val + checkpoint), s", "epoch_s", "epoch_ratio"),
                              ("fixed, s", "fixed_s", None)):
        lib, plain = r[f"library_{key}"], r[f"plain_{key}"]
        cell = f"{r[ratio]['median']:.3f} ({r[ratio]['q1']:.3f}–{r[ratio]['q3']:.3f})" if ratio else ""
        rows.append(f"| {label} | {lib['median']:.3f} | {plain['median']:.3f} | {cell} |")
    if "cpu" in r:  # process CPU time: steadier than wall time on a shared machine
        cpu, x = r["cpu"], r["cpu"]["ratio"]
        rows.append(f"| run, process CPU s | {cpu['library_s']['median']:.3f} | {cpu['plain_s']['median']:.3f} | "
                    f"{x['median']:.3f} ({x['q1']:.3f}–{x['q3']:.3f}) |")
    x = r["ratio_extrapolated"]
    rows.append(f"| run extrapolated to {c['target_epochs']} epochs | | | "
                f"{x['median']:.3f} ({x['q1']:.3f}–{x['q3']:.3f}) |")
    return rows


def _timing_rows(result: dict) -> list[str]:
    ops = result.get("ops_per_step", {})
    rows = ["", "| step / loop | median | IQR | min–max | ATen ops per step |", "|---|---|---|---|---|"]
    for name, t in result["timings_ms"].items():
        rows.append(f"| {name}, ms | {_fmt(t['median'])} | {_fmt(t['q1'])}–{_fmt(t['q3'])} | "
                    f"{_fmt(t['min'])}–{_fmt(t['max'])} | {ops.get(name, '')} |")
    if "fill" in result:
        for key in ("fill_samples_per_s", "bare_samples_per_s", "overhead_ms_per_segment"):
            t = result["fill"][key]
            rows.append(f"| {key} | {_fmt(t['median'])} | {_fmt(t['q1'])}–{_fmt(t['q3'])} | "
                        f"{_fmt(t['min'])}–{_fmt(t['max'])} | |")
    if "ops_ratios" in result:
        rows += ["", "Op-count ratios (same formulas as the time ratios, ATen calls instead of seconds): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in result["ops_ratios"].items())]
    return rows


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"## lightning_kd benchmark: {m['device']} ({m['device_name']}, {m['cpu_cores']} cores, "
        f"torch {m['torch_version']})",
        "",
        f"student {s['student']}, teacher {s['teacher']}, batch {s['batch_size']}, {s['repeats']} interleaved repeats "
        f"(+{s['warmup']} warm-up), bf16 {s['bf16']}, channels_last {s['channels_last']}; load average at start / "
        f"end {m.get('loadavg_start')} / {m.get('loadavg_end')}. ✓/✗: the median meets the goal.",
        "",
        "| quantity | median | spread (IQR) | goal | |",
        "|---|---|---|---|---|",
        *_headline_rows(result),
    ]
    if result.get("scale"):
        lines += _scale_rows(result["scale"])
    if result.get("remote"):
        lines += _remote_rows(result["remote"])
    if result.get("data"):
        lines += _data_rows(result["data"])
    if result.get("loop"):
        lines += _loop_rows(result["loop"])
    lines += _timing_rows(result)
    for pair, r in result.get("cuda_pairs", {}).items():
        lines += ["", f"**{pair}** ({r['image_size']}², batch {r['batch_size']}, bf16 autocast, channels_last)", "",
                  "| quantity | median | spread (IQR) | goal | |", "|---|---|---|---|---|"]
        lines += [_row(RATIO_LABELS[name], v, name) for name, v in r["ratios"].items()]
    return "\n".join(lines) + "\n"
