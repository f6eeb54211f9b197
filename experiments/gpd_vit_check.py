"""GPD for a ViT student at equal epochs under the teacher budget: a short accuracy check (issue 12, item 7).

One seed, one budget, three methods training the same small timm ViT student on the same cached teacher outputs
(the shared ResNet-20 teacher, the budget sweep's cache and DataModule settings: no new teacher calls once that
cache holds the budget):

* ``gpd``: :class:`GapPreservingDistillation` with ``experiments/cifar10/gpd_vit.yaml``'s settings (2x-wide
  dynamic teacher, no branches, SCE weight 3, KD at T = 4). Reported: the *extracted* student
  (:func:`~lightning_kd.reparam.extract_student`, a plain timm ``VisionTransformer``) and the dynamic teacher,
  both on the test set at the best-validation checkpoint (selected on the student's ``val/acc``);
* ``kd``: :class:`KnowledgeDistillation` (``method="kd"``, its defaults: α = 0.1 CE, T = 4);
* ``ce``: :class:`Supervised` (cross-entropy, no teacher).

All three use gpd_vit.yaml's optimizer (AdamW, LR, weight decay, cosine schedule per step) and batch size, the
same epochs and the same steps per epoch (budget // batch size). Wall time per epoch (training + validation)
is measured by a callback. Runs are resumable: each finished run is ``<out>/runs/<method>-d<depth>w<width>h<heads>-
b<budget>-e<epochs>-s<seed>.json`` and skipped next time; ``<out>/table.md`` is rebuilt from whatever runs exist.

    python experiments/gpd_vit_check.py --epochs 1                 # time one epoch of each method
    python experiments/gpd_vit_check.py --epochs 20                # the check
    python experiments/gpd_vit_check.py --report-only

The default student is a reduced ViT (``--depth/--embed-dim/--heads``, head dim 32, patch 4 at 32x32: 64 tokens
+ cls): ViT-Tiny (depth 12, width 192) is ~3x slower per step on one CPU core. Run one at a time, 1 thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_budget import ROOT, _datamodule, _trainer  # noqa: E402  (the budget sweep's DataModule and Trainer)

METHODS = ("gpd", "kd", "ce")
CONFIG = ROOT / "experiments" / "cifar10" / "gpd_vit.yaml"


def _settings(vit: dict) -> dict:
    """gpd_vit.yaml's model and batch settings, with the student's ``model_kwargs`` replaced by ``vit``."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    model = dict(cfg["model"]["init_args"])
    model["model_kwargs"] = {**model.get("model_kwargs", {}), **vit}
    shared = {k: model.pop(k) for k in ("student", "model_kwargs", "num_classes", "optimizer", "lr", "weight_decay",
                                         "scheduler")}  # fmt: skip
    if model.get("distill", "kd") != "kd":
        raise ValueError(f"{CONFIG.name}: this check compares GPD's KD terms with KD; got distill={model['distill']!r}")
    batch_size = cfg["data"]["init_args"]["datamodule"]["init_args"]["batch_size"]
    return {"shared": shared, "gpd": model, "batch_size": batch_size}


def run_name(method: str, budget: int, seed: int, epochs: int, vit: dict) -> str:
    return f"{method}-d{vit['depth']}w{vit['embed_dim']}h{vit['num_heads']}-b{budget}-e{epochs}-s{seed}"


def run_one(method: str, budget: int, seed: int, epochs: int, vit: dict, out: Path, cache_root: Path,
            threads: int) -> dict:
    """Train, select on validation accuracy, test; store and return the result."""
    import torch

    torch.set_num_threads(threads)
    import lightning as L
    import numpy as np
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_kd.callbacks import DynamicTeacherSharing
    from lightning_kd.modules import GapPreservingDistillation, KnowledgeDistillation, Supervised
    from lightning_kd.reparam import extract_student

    class EpochLog(L.Callback):
        """Per epoch: validation accuracies and wall seconds (training + validation, and training alone)."""

        def __init__(self) -> None:
            self.val: dict[str, list[float]] = {}
            self.epoch_s: list[float] = []
            self.train_s: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            # Lightning validates at the epoch's last step, *before* this hook: this time includes validation
            self.epoch_s.append(time.perf_counter() - self._t0)

        def on_validation_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.train_s.append(time.perf_counter() - self._t0)

        def on_validation_end(self, trainer, pl_module) -> None:
            for key in ("val/acc", "val/dt_acc"):
                if key in trainer.callback_metrics:
                    self.val.setdefault(key, []).append(round(float(trainer.callback_metrics[key]), 4))

    s = _settings(vit)
    L.seed_everything(seed, workers=True, verbose=False)
    if method == "gpd":
        model = GapPreservingDistillation(**s["shared"], **s["gpd"])
        extra = [DynamicTeacherSharing(check_every_n_steps=200)]
    elif method == "kd":
        model = KnowledgeDistillation(method="kd", **s["shared"])
        extra = []
    else:
        model = Supervised(**s["shared"])
        extra = []
    name = run_name(method, budget, seed, epochs, vit)
    dm = _datamodule(budget, seed, 1, cache_root / f"seed{seed}", s["batch_size"])
    ckpt = ModelCheckpoint(dirpath=out / "ckpt" / name, monitor="val/acc", mode="max")
    log = EpochLog()
    trainer = _trainer(epochs, [ckpt, log, *extra])
    start = time.perf_counter()
    trainer.fit(model, dm)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    test = trainer.test(model, dm, ckpt_path="best", verbose=False)[0]  # loads the best checkpoint into `model`
    result = {"method": method, "test_acc": test["test/acc"]}
    if method == "gpd":  # the extracted student and the DT at the same (best-validation) checkpoint
        model.eval()
        student, dt = extract_student(model.dynamic_teacher).eval(), model.dynamic_teacher
        acc_s, acc_dt = (MulticlassAccuracy(model.num_classes, average="micro") for _ in range(2))
        max_diff = 0.0
        with torch.no_grad():
            for i, batch in enumerate(dm.test_dataloader()):
                x, y = batch["input"], batch["target"]
                z = student(x)
                acc_s.update(z, y)
                acc_dt.update(dt(x), y)
                if i == 0:
                    max_diff = float((z - dt.forward_student(x)).abs().max())
        result.update(
            extracted_test_acc=float(acc_s.compute()),
            dt_test_acc=float(acc_dt.compute()),
            extracted_max_abs_diff=max_diff,
            extracted_class=f"{type(student).__module__}.{type(student).__qualname__}",
            dt_params=sum(p.numel() for p in dt.parameters()),
            dt_heads=dt.model.blocks[0].attn.num_heads,
        )
    test_s = time.perf_counter() - start
    curve = log.val["val/acc"]
    result.update(
        budget=budget,
        seed=seed,
        epochs=epochs,
        steps=trainer.global_step,
        best_epoch=int(np.argmax(curve)) + 1,
        best_val_acc=float(ckpt.best_model_score),
        val_acc_curve=curve,
        val_dt_acc_curve=log.val.get("val/dt_acc"),
        seconds_per_epoch=round(float(np.mean(log.epoch_s)), 2),
        train_seconds_per_epoch=round(float(np.mean(log.train_s)), 2),
        epoch_seconds=[round(t, 1) for t in log.epoch_s],
        fit_seconds=round(fit_s, 1),
        test_seconds=round(test_s, 1),
        threads=threads,
        student=s["shared"]["student"],
        model_kwargs=s["shared"]["model_kwargs"],
        student_params=sum(p.numel() for p in extract_student(model.dynamic_teacher).parameters())
        if method == "gpd" else sum(p.numel() for p in model.student.parameters()),
        settings={k: v for k, v in s["shared"].items() if k not in ("student", "model_kwargs")}
        | ({"gpd": s["gpd"]} if method == "gpd" else {}),
        batch_size=s["batch_size"],
        new_teacher_calls=dm.new_teacher_calls,
        train_samples=len(dm.train_indices),
        val_samples=len(dm.val_indices),
    )
    best = Path(ckpt.best_model_path)
    best.unlink(missing_ok=True)
    for folder in (best.parent, best.parent.parent):  # <out>/ckpt/<name>, then <out>/ckpt, once empty
        with contextlib.suppress(OSError):
            folder.rmdir()
    (out / "runs" / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def report(out: Path) -> str:
    """Rebuild ``table.md`` from the stored runs (grouped by epochs, budget, seed and student config)."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    runs.sort(key=lambda r: (r["epochs"], r["budget"], r["seed"], METHODS.index(r["method"])))
    lines = [
        "| method | epochs | test acc (%) | DT test acc (%) | best val acc (%) @ epoch | last val acc (%) | s/epoch "
        "(train + val) | s/epoch (train) | fit (min) | new teacher calls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        acc = 100 * r.get("extracted_test_acc", r["test_acc"])
        dt = f"{100 * r['dt_test_acc']:.2f}" if "dt_test_acc" in r else "–"
        name = "gpd (extracted student)" if r["method"] == "gpd" else r["method"]
        lines.append(
            f"| {name} | {r['epochs']} | {acc:.2f} | {dt} | {100 * r['best_val_acc']:.2f} @ {r['best_epoch']} | "
            f"{100 * r['val_acc_curve'][-1]:.2f} | {r['seconds_per_epoch']:.1f} | {r['train_seconds_per_epoch']:.1f} "
            f"| {r['fit_seconds'] / 60:.1f} | {r['new_teacher_calls']} |"
        )
    notes = []
    for cfg in sorted({json.dumps([r["student"], r["model_kwargs"], r["budget"], r["seed"]]) for r in runs}):
        student, kwargs, budget, seed = json.loads(cfg)
        group = [r for r in runs if [r["student"], r["model_kwargs"], r["budget"], r["seed"]] == [student, kwargs,
                                                                                                    budget, seed]]
        gpd = next((r for r in group if r["method"] == "gpd"), None)
        notes.append(
            f"- student `{student}` with model_kwargs `{json.dumps(kwargs)}` ({group[0]['student_params']:,} "
            f"parameters)" + (f"; dynamic teacher ratio {gpd['settings']['gpd']['ratio']}: {gpd['dt_heads']} heads, "
                              f"{gpd['dt_params']:,} parameters" if gpd else "")
            + f"; budget {budget} ({group[0]['train_samples']} training images with cached teacher outputs, "
            f"{group[0]['val_samples']} labelled validation images), seed {seed}, batch {group[0]['batch_size']}, "
            f"optimizer `{json.dumps({k: v for k, v in group[0]['settings'].items() if k != 'gpd'})}`"
        )
        if gpd:
            notes.append(f"- GPD settings: `{json.dumps(gpd['settings']['gpd'])}`; max |extracted − student view| "
                         f"on a test batch: {gpd['extracted_max_abs_diff']:.1e}")
    table = (
        "# GPD with a ViT student at equal epochs (issue 12, item 7)\n\n"
        + "\n".join(lines)
        + "\n\nTest accuracy on the 10,000 CIFAR-10 test images at the best-validation checkpoint (selected on the "
        "student's validation accuracy; for GPD the extracted student and its dynamic teacher, DT, at that "
        "checkpoint). One seed, a short schedule: not converged. Wall seconds per epoch on a shared, loaded 2-core "
        "CPU machine, 1 torch thread per run, one run at a time.\n\n"
        + "\n".join(notes)
        + "\n"
    )
    (out / "table.md").write_text(table)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "gpd_vit_check")
    p.add_argument("--cache-root", type=Path, default=None, help="default: $LKD_CACHE_DIR/sweep_budget")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        print(report(args.out))
        return
    from lightning_kd.data.cifar import default_cache_dir

    cache_root = args.cache_root or default_cache_dir() / "sweep_budget"
    vit = {"depth": args.depth, "embed_dim": args.embed_dim, "num_heads": args.heads}
    os.environ.setdefault("WANDB_MODE", "disabled")
    for method in args.methods:
        name = run_name(method, args.budget, args.seed, args.epochs, vit)
        if (args.out / "runs" / f"{name}.json").exists():
            print(f"{name}: done already", flush=True)
            continue
        r = run_one(method, args.budget, args.seed, args.epochs, vit, args.out, cache_root, args.threads)
        extra = f", DT {100 * r['dt_test_acc']:.2f}%" if "dt_test_acc" in r else ""
        print(
            f"{name}: test acc {100 * r.get('extracted_test_acc', r['test_acc']):.2f}%{extra} (best val epoch "
            f"{r['best_epoch']}), {r['seconds_per_epoch']:.1f} s/epoch, {r['new_teacher_calls']} new teacher calls",
            flush=True,
        )
        report(args.out)
    print(report(args.out))


if __name__ == "__main__":
    main()
