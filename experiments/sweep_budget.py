"""Accuracy vs teacher budget: CKD and the few-teacher-inference baselines on CIFAR-10.

Every run trains a student on ``budget`` training images whose teacher outputs are cached (the shared ResNet-20
teacher, one fixed augmented view per image) and reports test accuracy at the best-validation checkpoint. Runs
are resumable: each finished run is stored as ``<out>/runs/<budget>-<method>-<seed>.json`` and skipped next time
(one stored under another protocol is refused), and a run cut off mid-way resumes from its last finished epoch
(``<out>/ckpt/<name>/last.ckpt``), so the grid can be spread over sessions. The table (markdown + CSV) and the
plot are rebuilt from whatever runs exist; ``--readme`` writes the tables into README.md too. Sweeps may overlap
(two lanes, or the same command started twice): each run is claimed by a lock, so it is trained once. A sweep
stopped by ``kill`` (or ``kill -9``) stops its runs in flight too; each resumes from its checkpoint next time.

    python experiments/sweep_budget.py                      # the CPU grid, 300 epochs (2 workers x 1 thread):
                                                            # ~13 / 27 min per KD / CKD run on one core at budget
                                                            # 2,000; ~25-30 core-hours for the 72 runs
    python experiments/sweep_budget.py --protocol quick     # the first sweep's 15 epochs (not converged)
    python experiments/sweep_budget.py --protocol full      # the official protocol, for GPUs
    python experiments/sweep_budget.py --report-only        # rebuild table and plot (--readme: README too)

Methods (the registry ``experiments/methods.py``: module, arguments, group size, features). The default grid: ce (no
teacher), kd, mixup, cutmix, rkd, dist (:class:`KnowledgeDistillation`), ckd (:class:`ComparativeDistillation`,
pairs, MSE: the WACV release) and ckd_kl3 (groups of 3, KL: the arXiv release). On request (``--methods``): crd (CE
+ KD + 0.8·CRD on logits, the official CKD baseline); ckd_average, ckd_mixup (CKD's combine ablations); the
white-box baselines hint, vid, cc and feature CKD ckd_hint, ckd_vid, ckd_cc (hint_teacher_view,
ckd_hint_teacher_view, vid_teacher_view, cc_teacher_view: the student's feature from the teacher's own view instead
of its fresh augmentation); gpd, gpd_ckd (GPD with KD / CKD terms) and gpd_scratch (GPD without a teacher signal, on
the same samples). Each run also stores its validation-accuracy curve and best epoch (the convergence evidence); GPD
runs also the dynamic teacher's test accuracy at the same checkpoint (``dt_test_acc``; ``test_acc`` is the
student's, i.e. the extracted student's). All use the same selected samples and one fixed teacher view each, and the
same optimizer steps: an epoch is budget // 64 batches of 64 samples or of 64 CKD tuples (31 at budget 2,000; the
convergence probe's CKD runs predate this and took 32). Logit methods read the seed's logits cache (``seed<s>``: the
``.pt2`` teacher); feature methods read a features cache (``seed<s>-features``: the same teacher's weights as a
module, with its four stage outputs recorded once for all of them). The plot shows the default grid's methods only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the method registry beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.common import machine_info  # noqa: E402
from methods import FEATURE_TEACHER, GRID, LOGITS_TEACHER, METHODS, TEACHER_FEATURES  # noqa: E402
from sweep_report import report  # noqa: E402

PROTOCOLS = {
    # CPU: small student, cosine schedule. channels_last and evaluation batches of 128 make a run ~1.3x faster on
    # CPU (oneDNN) without changing the method. 300 epochs is the longest schedule probed on all of KD and CKD at
    # budget 2,000 (experiments/results/convergence/): at the edge of convergence (450 epochs: KD +0.5, CKD +0.7).
    "cpu": {"student": "resnet8", "epochs": 300, "lr": 0.05, "scheduler": "cosine", "batch_size": 64,
            "channels_last": True, "eval_batch_size": 128},
    # The first sweep's 15-epoch schedule (experiments/results/budget_sweep/quick/): far from converged, kept only
    # to reproduce that table; a few minutes per run.
    "quick": {"student": "resnet8", "epochs": 15, "lr": 0.05, "scheduler": "cosine", "batch_size": 64},
    # The official CKD protocol (LR x0.1 on validation plateau, up to 3 times), for GPUs.
    "full": {"student": "resnet8", "epochs": 240, "lr": 0.05, "scheduler": "plateau", "batch_size": 64},
}
ROOT = Path(__file__).resolve().parents[1]


def _cache_dir(cache_root: Path, seed: int, features: bool = False) -> Path:
    """The seed's shared cache: logits only (``seed<s>``), or logits and the four teacher features."""
    return cache_root / (f"seed{seed}-features" if features else f"seed{seed}")


def _datamodule(budget: int, seed: int, group_size: int, cache_dir: Path, batch_size: int, progress: bool = False,
                eval_batch_size: int = 512, features: bool = False, serve_teacher_view: bool = False, **selection):
    """The sweep's DataModule; ``features``: the module teacher recording :data:`TEACHER_FEATURES` as well;
    ``serve_teacher_view``: batches also carry the teacher's own view (for ``feature_view="teacher"``)."""
    from lightning_kd.data import CachedTeacherDataModule, CIFAR10DataModule

    teacher = (dict(teacher=dict(FEATURE_TEACHER), teacher_features=dict(TEACHER_FEATURES)) if features
               else dict(teacher=LOGITS_TEACHER))
    return CachedTeacherDataModule(
        CIFAR10DataModule(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=0),
        **teacher,
        budget=budget,
        cache_dir=str(cache_dir),
        seed=seed,
        group_size=group_size,
        progress=progress,
        serve_teacher_view=serve_teacher_view,
        **selection,
    )


def _trainer(epochs: int, callbacks: list, accelerator: str = "cpu"):
    """The experiments' Trainer: one device, no logger, no progress bar or summary, no sanity check."""
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def run_one(budget: int, method: str, seed: int, cfg: dict, out: Path, cache_root: Path, threads: int,
            name: str | None = None, cache_dir: Path | None = None, record: dict | None = None,
            **selection) -> dict | None:
    """Train and test one (budget, method, seed); returns and stores its result as ``<out>/runs/<name>.json``.

    ``selection`` (``selection``, ``rounds``, ...) goes to the DataModule; ``cache_dir`` defaults to the seed's
    shared cache under ``cache_root`` (its features cache for feature methods); ``record`` is stored in the result
    as it is (what the caller needs to tell the run apart). Sweeps over the same ``out`` may
    overlap: a run is claimed by the cache's writer lease (an exclusive ``flock`` on
    ``<out>/ckpt/writers/<name>.lock``, dropped by the kernel if its process dies), so a run another process is
    training returns ``None`` here, and one that finished meanwhile returns its stored result, instead of being
    trained twice and racing for its JSON and checkpoints.
    """
    from lightning_kd.cache.lock import WriterLease

    name = name or f"{budget}-{method}-{seed}"
    path = out / "runs" / f"{name}.json"
    try:
        lease = WriterLease(out / "ckpt", name)
    except BlockingIOError:
        print(f"[{name}] is being trained by another process; skipped here", flush=True)
        return None
    try:
        if path.exists():  # finished by another sweep since this one listed its runs
            return json.loads(path.read_text())
        result = {**_train(budget, method, seed, cfg, out, cache_root, threads, name, cache_dir, selection),
                  **(record or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        return result
    finally:
        lease.release()  # after the JSON: whoever takes the lease next finds it


def _train(budget: int, method: str, seed: int, cfg: dict, out: Path, cache_root: Path, threads: int, name: str,
           cache_dir: Path | None, selection: dict) -> dict:
    """The run itself: fit (resuming from ``last.ckpt``), test at the best checkpoint, remove the checkpoints."""
    import torch

    torch.set_num_threads(threads)
    import lightning as L
    import numpy as np
    from lightning.pytorch.callbacks import ModelCheckpoint

    class ValCurve(L.Callback):
        """Validation accuracy after every epoch (in order), and a progress line every tenth of the run (the
        workers run without progress bars; a long schedule is an hour per run on one CPU core). Its state (the
        curve, the fit time so far, the protocol, the devices) travels in the checkpoint, so a resumed run continues
        it. ``devices`` records where each stretch of epochs ran (a run started on a GPU may finish on a CPU)."""

        def __init__(self) -> None:
            self.acc: list[float] = []
            self.devices: list[dict] = []
            self.seconds = 0.0  # fit time before this process's start
            self.start = time.perf_counter()

        def elapsed(self) -> float:
            return self.seconds + time.perf_counter() - self.start

        def on_train_start(self, trainer, pl_module) -> None:  # after a checkpoint's restore
            self.devices.append({"device": str(trainer.strategy.root_device), "from_epoch": len(self.acc) + 1})

        def on_validation_end(self, trainer, pl_module) -> None:
            self.acc.append(float(trainer.callback_metrics["val/acc"]))
            done, total = len(self.acc), trainer.max_epochs
            if done % max(total // 10, 1) == 0 or done == total:
                best = int(np.argmax(self.acc))
                print(f"[{name}] epoch {done}/{total}: val acc {self.acc[-1]:.4f} (best {self.acc[best]:.4f} at "
                      f"{best + 1}), {self.elapsed() / done:.1f} s/epoch", flush=True)

        def state_dict(self) -> dict:
            return {"acc": self.acc, "seconds": self.elapsed(), "protocol": cfg, "devices": self.devices}

        def load_state_dict(self, state: dict) -> None:
            differs = _protocol_differences(state["protocol"], cfg)
            if differs:
                raise SystemExit(f"{last} was saved under another protocol ({differs}); delete it to start the run "
                                 "again")
            self.acc, self.seconds, self.start = list(state["acc"]), state["seconds"], time.perf_counter()
            self.devices = list(state.get("devices", []))

    class StopWithSweep(L.Callback):
        """A worker whose sweep died (``kill -9``: no SIGTERM handler runs) exits after its current batch, keeping
        its ``last.ckpt`` and storing no JSON, instead of training on (and on to the runs queued for it) beside the
        next sweep. It exits at once (``os._exit``; the kernel drops its lease): a pool worker that merely raised
        would wait forever for its next task, since it holds both ends of its task queue. The parent's sentinel
        pipe closes when the parent dies; the main process (no pool) has no parent to watch."""

        def on_train_batch_end(self, trainer, *args) -> None:
            parent = multiprocessing.parent_process()
            if parent is not None and not parent.is_alive():
                print(f"[{name}] stopped: its sweep (pid {parent.pid}) has died; the run resumes from its last "
                      "finished epoch next time", file=sys.stderr, flush=True)
                os._exit(1)

    L.seed_everything(seed, workers=True, verbose=False)
    spec = METHODS[method]
    model = spec.build(student=cfg["student"], lr=cfg["lr"], scheduler=cfg["scheduler"],
                       channels_last=cfg.get("channels_last", False))
    dm = _datamodule(budget, seed, spec.group_size, cache_dir or _cache_dir(cache_root, seed, spec.needs_features),
                     cfg["batch_size"], eval_batch_size=cfg.get("eval_batch_size", 512), features=spec.needs_features,
                     serve_teacher_view=spec.serve_teacher_view, **selection)
    # `last.ckpt` after every epoch: a run cut off (a session's end, a kill) resumes from its last finished epoch
    # with its curve, best checkpoint and fit time; the data order after the resume is fresh, not replayed.
    # (Lightning's save_last writes only when the best improves, so the last epoch gets its own checkpoint.)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt" / name, monitor="val/acc", mode="max")
    every_epoch = ModelCheckpoint(dirpath=out / "ckpt" / name, filename="last", enable_version_counter=False)
    last = out / "ckpt" / name / "last.ckpt"
    resume, resumed_at = _resume_point(last)
    curve = ValCurve()
    trainer = _trainer(cfg["epochs"], [ckpt, every_epoch, curve, StopWithSweep()], cfg.get("accelerator", "cpu"))
    trainer.fit(model, dm, ckpt_path=resume)
    # The curve as fitted: testing at the best checkpoint restores every callback's state from it, which would cut
    # the curve (and the devices) back to the best epoch.
    fit_s, acc, devices = curve.elapsed(), list(curve.acc), list(curve.devices)
    test = trainer.test(model, dm, ckpt_path=ckpt.best_model_path, verbose=False)[0]  # the best, not the last
    info = machine_info(trainer.strategy.root_device)
    result = {
        "budget": budget,
        "method": method,
        "seed": seed,
        "test_acc": test["test/acc"],
        **(_dynamic_teacher_results(model, dm, test) if hasattr(model, "dynamic_teacher") else {}),
        "best_val_acc": float(ckpt.best_model_score),
        "best_epoch": int(np.argmax(acc)) + 1,
        "val_acc_curve": [round(a, 4) for a in acc],
        "epochs": cfg["epochs"],
        "steps": trainer.global_step,
        "student": cfg["student"],
        "fit_seconds": round(fit_s, 1),
        "device": str(trainer.strategy.root_device),
        "devices": devices,
        "new_teacher_calls": dm.new_teacher_calls,
        "train_samples": len(dm.train_indices),
        "protocol": cfg,
        "selection": dict(selection),
        "rounds_log": dm.round_log,
        "resumed_at_epoch": resumed_at,
        # the machine that finished it: float rounding differs between CPUs (and torch builds), so the same run on
        # another machine is another draw of its seed (README, "Reproducing a run")
        "machine": {k: info[k] for k in ("cpu_model", "torch_version", "torch_threads", "device_name")},
    }
    Path(ckpt.best_model_path).unlink(missing_ok=True)
    last.unlink(missing_ok=True)
    if not any(last.parent.iterdir()):
        last.parent.rmdir()
    return result


def _resume_point(path: Path) -> tuple[str | None, int]:
    """``(path, finished epochs)`` when ``path`` holds a whole checkpoint to resume from, else ``(None, 0)``; a
    file cut short by a kill is removed (its run starts again rather than fail)."""
    if not path.exists():
        return None, 0
    import torch

    try:
        epoch = torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except Exception as err:  # a torn write
        print(f"{path} is unreadable ({type(err).__name__}); the run starts again", flush=True)
        path.unlink()
        return None, 0
    return str(path), int(epoch) + 1


def _dynamic_teacher_results(model, dm, test: dict) -> dict:
    """GPD at the tested (best) checkpoint: the DT's test accuracy, and how far the extracted student's logits are
    from ``model(x)`` (the student view, whose accuracy is ``test_acc``) on the first test batch."""
    import torch

    from lightning_kd.reparam import extract_student

    model.eval()
    x = next(iter(dm.test_dataloader()))["input"].to(model.device)
    with torch.no_grad():
        gap = (extract_student(model.dynamic_teacher).eval()(x) - model(x)).abs().max()
    return {"dt_test_acc": test["test/dt_acc"], "extracted_max_abs_diff": float(gap)}


# How a run is computed, not what it computes (the same training up to float rounding): runs that differ only in
# these are the same experiment (the probe's first KD runs predate channels_last and the evaluation batch of 128).
EXECUTION_KEYS = frozenset({"accelerator", "channels_last", "eval_batch_size"})


def _protocol_differences(stored: dict, cfg: dict) -> str:
    """The protocol keys whose values differ (execution keys aside), as ``key: stored there, cfg now``; "" if none."""
    keys = sorted(k for k in (cfg.keys() | stored.keys()) - EXECUTION_KEYS if cfg.get(k) != stored.get(k))
    return ", ".join(f"{k}: {stored.get(k)!r} there, {cfg.get(k)!r} now" for k in keys)


def _done(path: Path, cfg: dict) -> bool:
    """Whether the run's JSON exists; one stored under another protocol is refused, never mixed into the table."""
    if not path.exists():
        return False
    differs = _protocol_differences(json.loads(path.read_text()).get("protocol", {}), cfg)
    if differs:
        raise SystemExit(f"{path} was run under another protocol ({differs}); use another --out or move it away")
    return True


def _stop_workers(signum, frame) -> None:
    """SIGTERM (``kill``) stops the runs in flight too: a worker outliving the sweep would go on training and could
    write the same run's JSON as the next sweep started over the same results. A stopped run leaves no JSON and is
    redone next time."""
    for child in multiprocessing.active_children():
        child.kill()
    raise SystemExit(128 + signum)


def add_run_arguments(p: argparse.ArgumentParser, results: str) -> None:
    """The options every experiment runner shares: seeds, protocol, parallelism, device, where results go."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--protocol", choices=PROTOCOLS, default="cpu")
    p.add_argument("--epochs", type=int, help="override the protocol's epochs")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator of every run: 'auto' takes a GPU "
                   "when there is one (several workers then share it: resnet8 runs are small), else the CPU")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / results)
    p.add_argument("--cache-root", type=Path, default=None, help="default: $LKD_CACHE_DIR/<runner>")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables and plot from the stored runs")
    p.add_argument("--readme", action="store_true", help="also write the tables into README.md's result blocks")


def run_setup(args: argparse.Namespace, caches: str) -> tuple[dict, Path, Path]:
    """``(protocol config, results folder, cache root)`` of a runner's arguments; creates ``<out>/runs``."""
    from lightning_kd.data.cifar import default_cache_dir

    cfg = dict(PROTOCOLS[args.protocol], protocol=args.protocol, accelerator=args.accelerator)
    if args.epochs:
        cfg["epochs"] = args.epochs
    out = args.out / args.protocol
    (out / "runs").mkdir(parents=True, exist_ok=True)
    return cfg, out, args.cache_root or default_cache_dir() / caches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--methods", nargs="+", default=list(GRID), choices=METHODS)
    add_run_arguments(p, "budget_sweep")
    args = p.parse_args()
    cfg, out, cache_root = run_setup(args, "sweep_budget")
    if args.report_only:
        print(report(out, args.readme))
        return

    # Fill each seed's cache once, up front, for the largest budget (selections are nested, so every smaller
    # budget finds its outputs there); parallel runs then never call the teacher.
    # Feature methods share a second cache per seed (the module teacher, all four layers), filled the same way.
    for seed in args.seeds:
        for features in sorted({METHODS[m].needs_features for m in args.methods}):
            dm = _datamodule(max(args.budgets), seed, 1, _cache_dir(cache_root, seed, features), 64, progress=True,
                             features=features)
            dm.fill()
            print(f"seed {seed}: {_cache_dir(cache_root, seed, features)} filled, {dm.new_teacher_calls} new teacher "
                  "calls", flush=True)

    todo = [(b, m, s) for s in args.seeds for b in args.budgets for m in args.methods
            if not _done(out / "runs" / f"{b}-{m}-{s}.json", cfg)]
    print(f"{len(todo)} runs to do ({args.workers} workers x {args.threads} threads); results in {out}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    signal.signal(signal.SIGTERM, _stop_workers)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, b, m, s, cfg, out, cache_root, args.threads): (b, m, s) for b, m, s in todo}
        for fut in as_completed(futures):
            r = fut.result()
            if r is None:  # another sweep is training it
                continue
            print(
                f"budget {r['budget']:5d} {r['method']:11s} seed {r['seed']}: test acc {100 * r['test_acc']:.2f}% "
                f"({r['fit_seconds']:.0f} s, {r['new_teacher_calls']} new teacher calls)",
                flush=True,
            )
            report(out, args.readme)
    print(report(out, args.readme))


if __name__ == "__main__":
    main()
