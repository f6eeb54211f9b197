"""What lightning_kd's machinery costs: training steps, cache fill, an ImageNet-size cache, student extraction.

    python experiments/bench.py                         # CPU, writes experiments/results/bench_cpu.{json,md}
    python experiments/bench.py --device cuda --bf16 --channels-last
    python experiments/bench.py --skip-scale --repeats 10   # quick look, no 2.6 GB cache

The numbers (every "median / spread" is over repeats: median and interquartile range, plus min/max in the JSON)
-----------------------------------------------------------------------------------------------------------
1. Step cost. Each variant is one full optimizer step -- ``zero_grad``, forward + loss through the module's own
   ``training_step``, ``backward``, ``optimizer.step()`` (SGD with the module's own lr / momentum / Nesterov /
   weight decay, as ``configure_optimizers`` builds it) -- on the same student architecture (same init) and the
   same batch of B images. The variants run *interleaved*: every repeat runs each variant once, in an order rotated
   from repeat to repeat, so background load hits all of them alike. There is no Trainer, so ``self.log`` is
   replaced by a no-op on every module (Lightning would only warn and return); ``log_train`` still runs, so the
   training-accuracy update each step does is included, Trainer-side logging is not. Ratios are formed *per
   repeat* (paired, so slow drifts of background load cancel) and then summarized:

   - ``cached_kd_step``     = t(KnowledgeDistillation step on a batch that carries cached ``teacher_logits``)
                              / t(CE step). The CE step (the floor, = 1.0) is ``Supervised.training_step``.
                              Goal <= 1.05.
   - ``ckd_step_per_image`` = [t(ComparativeDistillation step on B/2 pairs, a (B/2, 2, C, H, W) batch) / B]
                              / [t(CE step on B images) / B]: both steps push the same B images through the
                              student, so the per-image ratio equals the per-step ratio. Goal <= 1.10.
   - ``online_kd_step``     = t(teacher forward under ``inference_mode`` + KD step) / t(CE step): a teacher in
                              the loop, i.e. what the cache saves on every step. No goal (informative).
   - ``gpd_step_vs_parts``  = t(GapPreservingDistillation step, batch with cached teacher logits)
                              / [t(CE step of a plain wide model) + t(CE step of the plain student)], each part
                              its own optimizer step. The plain wide model is the dynamic teacher materialised as
                              ordinary Conv2d / Linear / BatchNorm2d layers of the DT's widths (branches merged).
                              Goal <= 1.15.

   On CPU the JSON also holds ``ops_per_step`` (ATen operator calls in one step, views included, counted with a
   TorchDispatchMode) and ``ops_ratios`` (the same ratios over op counts): small models on a GPU are bound by
   kernel launches, so these hint at the GPU ratios on a machine that has none. ``--threads 1`` gives steadier
   CPU timings on a loaded machine.

2. Cache fill. ``cache_fill_vs_teacher`` = samples/s of ``fill_cache`` (teacher + a claim in the shared ledger
   under the directory lock + one validated, fsynced block per batch + its commit record, over
   ``CIFAR10DataModule().make_dataset(indices, "fixed", normalize=False)`` into a
   fresh float32 ``TeacherCache`` with a ``TeacherBudget``) / samples/s of a bare ``torch.inference_mode``
   teacher loop over the same batches of the same dataset (same batch size, same DataLoader, outputs brought to
   the CPU). Paired per repeat, interleaved. Creating the empty cache and budget is not timed. Goal >= 0.9.
   ``overhead_ms_per_segment`` = (t_fill - t_bare) / batches (one block per teacher batch): the fixed cost of
   the claim + durable block + commit protocol, to set against the teacher's time per batch on another device.

3. Scale. A synthetic ImageNet-size cache (``--scale-rows`` x ``--scale-classes``, default 1,281,167 x 1,000), once
   in float16 and once top-k (k = ``--topk``), written in chunks of ``--scale-chunk`` rows through
   ``TeacherCache.write`` (``build_s``: write time only, the random logits are made beforehand) and compacted to one
   block as ``CachedTeacherDataModule`` does after a fill (``compact_s``, streamed in 1,024-row chunks). ``disk_gb``
   is the size of the live files (GB = 1e9 bytes). ``gather_ms_batch256_*``: median time of
   ``cache.get(256 random indices)`` through the memory map of the compacted cache, after warm-up (the page cache is
   warm: the file was just written; cold reads from disk are slower). ``..._uncompacted``: the same on the cache as
   written (one memory map per block). ``open_s``: ``TeacherCache(dir)`` with the default verification (crc32 of
   every chunk). ``train_rss_gb``: peak resident memory (VmHWM) of a separate process that opens the cache and runs
   ``--rss-gathers`` random batch-256 gathers, next to ``..._baseline_gb`` (that process right after importing torch
   and ``lightning_kd.cache``, the package ``__init__`` bypassed), split into anonymous memory (what the process
   owns: it must stay far below the file size) and file-backed pages (clean page-cache pages that the kernel's
   fault-around maps 64 KB at a time around each random read of a warm file; reclaimable, not owned).
   ``build_rss_gb``: how much the building process's RSS grew while writing. Needs ~2x the fp16 size on disk
   (compaction writes its copy before the old blocks go); checked first, skipped with a message otherwise.

4. Remote teacher (``experiments/benchmarks/remote.py``). Samples/s of ``fill_cache`` through ``RemoteTeacher``
   against ``tests/remote_server.py`` on 127.0.0.1 (JSON and npy codecs, 1 request in flight) vs the in-process
   teacher, and against a server adding 50 ms per request, 4 requests in flight vs 1
   (``latency50ms_4_vs_1_in_flight``, goal >= 3: latency hiding). One measurement each.

5. Extraction. ``extraction_s_resnet18``: median time of ``extract_student`` on a GPD dynamic teacher built from
   timm ``resnet18`` (ratio 2, CBR branches, noise 1e-6, as ``GapPreservingDistillation`` builds it), CPU. Goal
   < 1 s. ``expand_s_resnet18``: time of ``expand`` itself (tracing + verification forwards included).

6. ``--device cuda`` also runs section 1 for resnet32x4 -> resnet8x4 (32x32) and timm resnet50 -> resnet18
   (224x224, ``--imagenet-batch-size``) with bf16 autocast and channels_last, under ``cuda_pairs``.

7. Data paths (``benchmarks/data.py``): images/s of the fill's data path (seeded teacher view, decoding in
   DataLoader workers, claims, durable blocks; a free teacher) and of the training data path over an ImageFolder,
   each / a plain torchvision ``DataLoader(ImageFolder)`` with the same transform, batch and workers
   (``data_fill_vs_plain_loader``, ``data_train_vs_plain_loader``; goal >= 0.9).

9. Training loop (``benchmarks/loop.py``, CPU). ``loop_vs_plain`` = wall time of the project's KD run
   (``sweep_budget.run_one``'s Trainer: KnowledgeDistillation resnet8 on the cached budget-``--loop-budget``
   CIFAR-10 samples, batch 64, validation every epoch, ModelCheckpoint on val/acc, test at the best checkpoint)
   / wall time of a plain PyTorch loop doing the same work (same init, cached logits, tensor crop + flip, loss,
   SGD + per-step cosine, validation, ``torch.save`` of the best state, test), ``--loop-epochs`` epochs, run
   alternately (``--loop-repeats``, after ``--loop-warmup`` untimed one-epoch runs of each), paired per repeat.
   Goal <= 1.10. Also per-epoch and fixed (start-up + test) costs of each, and the ratio extrapolated to 30 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.common import ROOT, machine_info, resolve_device, resolve_teacher  # noqa: E402
from benchmarks.cuda import bench_cuda_pairs  # noqa: E402
from benchmarks.data import run as bench_data  # noqa: E402
from benchmarks.extraction import bench_extraction  # noqa: E402
from benchmarks.fill import bench_fill  # noqa: E402
from benchmarks.loop import bench_loop  # noqa: E402
from benchmarks.remote import run as bench_remote  # noqa: E402
from benchmarks.report import GOALS, markdown  # noqa: E402
from benchmarks.scale import bench_scale, rss_child  # noqa: E402
from benchmarks.steps import StepConfig, bench_steps  # noqa: E402


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teacher", default="auto",
                   help="'auto' (shared ResNet-20 file, else zoo resnet20), a path, or a model name")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--gpd-ratio", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 is steadier on a loaded machine")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the steps (meant for cuda)")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and inputs (meant for cuda)")
    p.add_argument("--fill-samples", type=int, default=5000)
    p.add_argument("--fill-batch-size", type=int, default=500, help="fill_cache's default")
    p.add_argument("--fill-repeats", type=int, default=5)
    p.add_argument("--skip-fill", action="store_true")
    p.add_argument("--scale-rows", type=int, default=1_281_167)
    p.add_argument("--scale-classes", type=int, default=1000)
    p.add_argument("--scale-chunk", type=int, default=10_000, help="rows per TeacherCache.write (one segment each)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--scale-dir", default=None, help="where the temporary caches go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scale caches")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--remote-samples", type=int, default=2000, help="samples per remote fill measurement")
    p.add_argument("--remote-batch", type=int, default=100)
    p.add_argument("--skip-remote", action="store_true")
    p.add_argument("--data-samples", type=int, default=2000, help="images per data-path measurement")
    p.add_argument("--data-batch", type=int, default=250)
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--data-repeats", type=int, default=15, help="interleaved repeats of each data-path measurement")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--gather-batch", type=int, default=256)
    p.add_argument("--gather-warmup", type=int, default=50)
    p.add_argument("--gathers", type=int, default=1000)
    p.add_argument("--rss-gathers", type=int, default=300)
    p.add_argument("--extract-model", default="resnet18")
    p.add_argument("--extract-input", type=int, default=224)
    p.add_argument("--extract-repeats", type=int, default=5)
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--imagenet-batch-size", type=int, default=64, help="cuda pair resnet50 -> resnet18 at 224x224")
    p.add_argument("--loop-epochs", type=int, default=5, help="epochs per run of the training-loop section")
    p.add_argument("--loop-repeats", type=int, default=3)
    p.add_argument("--loop-warmup", type=int, default=1, help="untimed one-epoch runs of each before timing")
    p.add_argument("--loop-budget", type=int, default=2000, help="cached training samples (sweep_budget's cache)")
    p.add_argument("--loop-cache-dir", default=None,
                   help="default: $LKD_CACHE_DIR/sweep_budget/seed0 (filled if needed)")
    p.add_argument("--loop-test-batches", type=int, default=None, help="test batches (default: the whole test split)")
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-batch", type=int, default=256, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """All sections; returns the JSON-ready result (also written to --json / --md)."""
    import torch

    device = resolve_device(args.device)
    teacher, teacher_desc = resolve_teacher(args.teacher, args.num_classes)
    result: dict = {"machine": machine_info(device), "settings": {**vars(args), "teacher": teacher_desc}}
    result["settings"].pop("rss_child")
    ratio_summaries: dict[str, dict] = {}

    teacher.to(device)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    cfg = StepConfig(args.student, teacher, args.num_classes, 32, args.batch_size, device,
                     args.bf16, args.channels_last, args.gpd_ratio)
    print(f"[steps] {args.student} <- {teacher_desc}, batch {args.batch_size}, {args.repeats} interleaved repeats",
          flush=True)
    clock = time.perf_counter()
    steps = bench_steps(cfg, args.warmup, args.repeats)
    section_s = {"steps": time.perf_counter() - clock}
    ratio_summaries.update(steps["ratios"])
    result["timings_ms"] = steps["timings_ms"]
    for key in ("ops_per_step", "ops_ratios"):
        if key in steps:
            result[key] = steps[key]

    if not args.skip_fill:
        print(f"[fill] {args.fill_samples} CIFAR-10 samples, batch {args.fill_batch_size}, {args.fill_repeats} repeats",
              flush=True)
        tmp_root = Path(args.scale_dir or tempfile.gettempdir())
        result["fill"] = bench_fill(teacher, args.fill_samples, args.fill_batch_size, device,
                                    min(args.warmup, 1), args.fill_repeats, tmp_root)
        ratio_summaries["cache_fill_vs_teacher"] = result["fill"]["ratio"]
        section_s["fill"] = time.perf_counter() - clock - sum(section_s.values())

    if not args.skip_scale:
        result["scale"] = bench_scale(args)
        section_s["scale"] = time.perf_counter() - clock - sum(section_s.values())
    if not args.skip_remote:
        print(f"[remote] fill through RemoteTeacher, {args.remote_samples} samples, batch {args.remote_batch}",
              flush=True)
        result["remote"] = bench_remote(max(args.threads, 1), args.remote_samples, args.remote_batch)
        section_s["remote"] = time.perf_counter() - clock - sum(section_s.values())
    if not args.skip_data:
        print(f"[data] ImageFolder data paths, {args.data_samples} images, {args.data_workers} workers, "
              f"{args.data_repeats} interleaved repeats", flush=True)
        result["data"] = bench_data(samples=args.data_samples, batch_size=args.data_batch,
                                    num_workers=args.data_workers, repeats=args.data_repeats)
        ratio_summaries["data_fill_vs_plain_loader"] = result["data"]["fill"]["ratio"]
        ratio_summaries["data_train_vs_plain_loader"] = result["data"]["train"]["ratio"]
        section_s["data"] = time.perf_counter() - clock - sum(section_s.values())
    if not args.skip_extract:
        print(f"[extract] {args.extract_model} ratio 2", flush=True)
        result["extraction"] = bench_extraction(args.extract_model, 2.0, args.extract_input, args.extract_repeats)
        result["extraction_s_resnet18"] = result["extraction"]["extract"]["median"]
        result["expand_s_resnet18"] = result["extraction"]["expand_s"]
        section_s["extraction"] = time.perf_counter() - clock - sum(section_s.values())

    if not args.skip_loop:
        print(f"[loop] KD run vs plain PyTorch loop, {args.loop_epochs} epochs, budget {args.loop_budget}, "
              f"{args.loop_repeats} alternating repeats", flush=True)
        result["loop"] = bench_loop(args.loop_epochs, args.loop_budget, args.loop_repeats, warmup=args.loop_warmup,
                                    cache_dir=args.loop_cache_dir, test_batches=args.loop_test_batches,
                                    tmp_root=Path(args.scale_dir) if args.scale_dir else None)
        ratio_summaries["loop_vs_plain"] = result["loop"]["ratio"]
        section_s["loop"] = time.perf_counter() - clock - sum(section_s.values())

    if device.type == "cuda":
        result["cuda_pairs"] = bench_cuda_pairs(args, device)
        section_s["cuda_pairs"] = time.perf_counter() - clock - sum(section_s.values())

    result["section_s"] = section_s
    result["ratio_summaries"] = ratio_summaries
    result["ratios"] = {k: v["median"] for k, v in ratio_summaries.items()}
    result["goals"] = {k: f"{op} {g}" for k, (g, op) in GOALS.items()}
    result["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result



def write_outputs(result: dict, args: argparse.Namespace) -> tuple[Path, Path]:
    default = ROOT / "experiments" / "results" / f"bench_{args.device}"
    json_path = Path(args.json) if args.json else default.with_suffix(".json")
    md_path = Path(args.md) if args.md else default.with_suffix(".md")
    for path in (json_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.rss_gathers, args.rss_batch)))
        return {}
    import torch

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting
    json_path, md_path = write_outputs(result, args)
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    if "--rss-child" in sys.argv:
        # Import lightning_kd.cache without the package __init__ (Lightning, timm, ...): the child's memory is then
        # the cache's plus torch's, not the framework's.
        import types

        pkg = types.ModuleType("lightning_kd")
        pkg.__path__ = [str(ROOT / "lightning_kd")]
        sys.modules.setdefault("lightning_kd", pkg)
    main()

