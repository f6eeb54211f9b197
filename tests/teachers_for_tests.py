"""A deterministic, counting stand-in for an expensive teacher, and entry points for subprocess tests.

Run as a script: ``python tests/teachers_for_tests.py fill CACHE_DIR LOG BUDGET BATCH SLEEP`` fills a cache
(used by the kill -9 test); ``python tests/teachers_for_tests.py ddp OUT_DIR CACHE_DIR BUDGET`` trains KD for a
few steps under DDP on 2 CPU processes and writes what each rank saw (used by the DDP test; ``ddp_features``: the
same for feature CKD over cached teacher features); ``gpd_ddp``,
``gpd_fsdp``, ``gpd_vit_ddp``, ``gpd_vit_fsdp OUT_DIR CACHE_DIR BUDGET`` do the same for GPD (the GPD DDP and FSDP
tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

_W = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))


def teacher_function(x: torch.Tensor) -> torch.Tensor:
    """Deterministic logits from 2x2-pooled pixels: different images give different outputs.

    Computed in float64 and rounded to float32, so a sample's logits do not depend on the batch it came in (a
    float32 matmul may take another kernel, with other rounding, for another batch size): tests compare bytes."""
    return (F.adaptive_avg_pool2d(x.double(), 2).flatten(1) @ _W.double() * 4).float()


def wait_for_file(path, seconds: float) -> None:
    """Block until ``path`` exists; a TimeoutError naming it after ``seconds``."""
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {seconds} s")
        time.sleep(0.005)


class CountingTeacher:
    """Counts every sample it is run on; optionally fails on its ``fail_at``-th call, sleeps, or appends each
    paid call to ``log`` (fsynced before returning, so a killed process still leaves a true count). Two processes
    can order their first calls: one creates the file ``mark`` at its first call, the other waits for that file
    (up to 120 s) before its own first call (``wait_for``)."""

    fingerprint = "test-teacher-v1"

    def __init__(self, fail_at: int | None = None, sleep: float = 0.0, log: str | None = None,
                 mark: str | None = None, wait_for: str | None = None) -> None:
        self.fail_at, self.sleep, self.log = fail_at, sleep, log
        self.mark, self.wait_for = mark, wait_for
        self.calls = 0
        self.invocations = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.invocations += 1
        if self.invocations == 1 and self.mark:
            open(self.mark, "w").close()
        if self.invocations == 1 and self.wait_for:
            wait_for_file(self.wait_for, 120)
        if self.fail_at == self.invocations:
            from lightning_kd.teachers import TeacherCallError

            raise TeacherCallError(f"teacher API failed on call {self.invocations}", processed=False)
        time.sleep(self.sleep)
        out = teacher_function(x)
        self.calls += len(x)
        if self.log:  # one line per paid call: the sha256 prefix of each sample, so a sample paid twice shows
            digests = [hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in x.detach().cpu().float()]
            with open(self.log, "a") as f:
                f.write(" ".join(digests) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return out


def logged_samples(log) -> list[str]:
    """Every sample digest a :class:`CountingTeacher` with ``log`` was paid for (one per sample per call)."""
    from pathlib import Path

    return Path(log).read_text().split() if Path(log).exists() else []


def run_helper(mode: str, *args, cwd):
    """Run this file as a script (``mode`` and its arguments) in a fresh process, the package importable."""
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, __file__, mode, *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def make_datamodule(teacher, cache_dir, budget, **kw):
    from lightning_kd.data import CachedTeacherDataModule, CIFAR10DataModule

    kw.setdefault("progress", False)
    return CachedTeacherDataModule(CIFAR10DataModule(batch_size=32), teacher, budget=budget, cache_dir=str(cache_dir),
                                   **kw)


def _fill(cache_dir: str, log: str, budget: str, batch: str, sleep: str, gate: str = "", out: str = "",
          offset: str = "0") -> None:
    """Fill a cache and write a result JSON. With a ``gate`` folder: once loaded, say so (``ready-<pid>``), wait
    for the file ``go`` (the start instant, written when every process is ready) and start ``offset`` s after it."""
    import warnings
    from pathlib import Path

    teacher = CountingTeacher(sleep=float(sleep), log=log)
    dm = make_datamodule(teacher, cache_dir, int(budget), fill_batch_size=int(batch))
    dm.setup("fit")  # load the data before the start line, so that processes really start together
    if gate:
        (Path(gate) / f"ready-{os.getpid()}").touch()
        wait_for_file(Path(gate) / "go", 300)
        start_at = float((Path(gate) / "go").read_text()) + float(offset)
        while time.time() < start_at:
            time.sleep(0.001)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.fill()
    if out:
        with open(out, "w") as f:
            json.dump({"calls": dm.new_teacher_calls, "train": len(dm.train_indices),
                       "selected": len(dm.selected), "warnings": [str(w.message) for w in caught]}, f)


def _ddp(out_dir: str, cache_dir: str, budget: str, fail_on_rank: str = "") -> None:
    import lightning as L

    from lightning_kd.modules import KnowledgeDistillation

    rank = int(os.environ.get("LOCAL_RANK", 0))
    if fail_on_rank:  # the failing rank's first call fails, and the other rank's first call waits for it: a fast
        started = os.path.join(out_dir, "failing_rank_called")  # rank could otherwise buy everything alone
        failing = fail_on_rank == str(rank)
        teacher = CountingTeacher(fail_at=1 if failing else None, **{"mark" if failing else "wait_for": started})
    else:
        teacher = CountingTeacher()
    dm = make_datamodule(teacher, cache_dir, int(budget), fill_batch_size=50)
    model = KnowledgeDistillation(student="resnet8", lr=0.01)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, dm)
    rank = trainer.global_rank
    cache = dm.cache
    values = cache.get(cache.indices)
    result = {
        "rank": rank,
        "calls": teacher.calls,
        "cached": len(cache),
        "indices_sha": hashlib.sha256(cache.indices.tobytes()).hexdigest(),
        "values_sha": hashlib.sha256(values.numpy().tobytes()).hexdigest(),
        "values_sum": float(values.double().sum()),
        "values": values[:5].tolist(),
        "budget_used": dm.budget_state.used,
        "new_calls": dm.new_teacher_calls,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _ddp_folder(out_dir: str, cache_dir: str, root: str, budget: str, log: str) -> None:
    """KD for 2 steps under DDP on 2 CPU processes over an ImageFolder (teacher at 32 px, student at 24 px)."""
    import lightning as L
    from torchvision.datasets import ImageFolder

    from lightning_kd.data import CachedTeacherDataModule, DatasetDataModule
    from lightning_kd.data.views import image_transform
    from lightning_kd.modules import KnowledgeDistillation

    data = DatasetDataModule(ImageFolder(root), train_transform=image_transform(24, train=True),
                             eval_transform=image_transform(24), teacher_transform=image_transform(32, train=True),
                             batch_size=8, val_size=20)
    teacher = CountingTeacher(log=log)
    dm = CachedTeacherDataModule(data, teacher, budget=int(budget), cache_dir=cache_dir, fill_batch_size=10,
                                 progress=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(KnowledgeDistillation(student="resnet8", lr=0.01), dm)
    cache = dm.cache
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"calls": teacher.calls, "new_calls": dm.new_teacher_calls, "cached": len(cache),
                   "train": len(dm.train_indices), "values_sha": hashlib.sha256(
                       cache.get(cache.indices).numpy().tobytes()).hexdigest()}, f)


def _ddp_features(out_dir: str, cache_dir: str, budget: str) -> None:
    """Feature CKD (hint on the teacher's layer 2) for 2 steps under DDP on 2 CPU processes, the ranks seeded
    differently; write what each rank paid for, what the cache holds (logits and features) and a digest of the
    trained student + feature head."""
    import lightning as L
    from features_for_tests import CountingNet, feature_datamodule

    from lightning_kd.modules import ComparativeDistillation

    torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))  # DDP must broadcast rank 0's student and head
    teacher = CountingNet()
    dm = feature_datamodule(teacher, cache_dir, int(budget), group_size=2)
    model = ComparativeDistillation(student="resnet8", feature_loss="hint", student_features={"l2": "layer2"})
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, dm)
    cache = dm.cache
    features = cache.get_features(cache.indices)

    def digest(tensors):
        return hashlib.sha256(b"".join(t.detach().float().numpy().tobytes() for t in tensors)).hexdigest()

    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"samples": teacher.samples, "cached": len(cache), "budget_used": dm.budget_state.used,
                   "cache_sha": digest([cache.get(cache.indices), *(features[n] for n in sorted(features))]),
                   "feature_shapes": {n: list(v.shape) for n, v in features.items()},
                   "head_params": sum(p.numel() for p in model.feature_head.parameters()),
                   "trained_sha": digest(model.parameters()), "steps": trainer.global_step}, f)


GPD_STUDENTS = {  # the students of the GPD multi-process tests: a CNN with CBR branches, a ViT (3 heads -> 5 wide)
    "gpd": dict(student="resnet8", branches=True, lr=0.05),
    "gpd_vit": dict(student="vit_tiny_patch16_224", optimizer="adamw", lr=1e-3,
                    model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2}),
}


def _gpd_strategy(name: str):
    """``ddp``, or FSDP2 as Lightning runs it: ``ModelParallelStrategy`` over 2 data-parallel ranks."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return {"ddp": "ddp", "fsdp": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}[name]


def _gpd_parallel(name: str, strategy: str, out_dir: str, cache_dir: str, budget: str) -> None:
    """Train GPD (student ``GPD_STUDENTS[name]``) 3 steps on 2 CPU processes under ``strategy`` (ddp / fsdp),
    validating once; rank zero extracts and evaluates the student. Write what each rank held: its own initial DT,
    the full DT at fit start and after fit, the student it extracts from that, and the student view's eval logits
    on a fixed input."""
    import lightning as L

    from lightning_kd.callbacks import DynamicTeacherSharing, StudentExtraction
    from lightning_kd.callbacks.sharing import full_parameters
    from lightning_kd.modules import GapPreservingDistillation
    from lightning_kd.reparam import extract_student

    def digest(tensors):
        return hashlib.sha256(b"".join(t.detach().float().clone().numpy().tobytes() for t in tensors)).hexdigest()

    class FitStart(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            with full_parameters(trainer):
                self.sha = digest(pl_module.dynamic_teacher.parameters())

    torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))  # ranks initialise differently: the strategy must sync
    dm = make_datamodule(CountingTeacher(), cache_dir, int(budget), fill_batch_size=50)
    model = GapPreservingDistillation(ratio=1.5, noise_std=1e-3, **GPD_STUDENTS[name])
    local_init = digest(model.dynamic_teacher.parameters())
    fit_start, extraction = FitStart(), StudentExtraction(dirpath=out_dir)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=_gpd_strategy(strategy), max_steps=3, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[DynamicTeacherSharing(check_every_n_steps=1), extraction, fit_start],
    )
    before = extract_student(model.dynamic_teacher).state_dict()
    trainer.fit(model, dm)
    with full_parameters(trainer):
        student = extract_student(model.dynamic_teacher)
        dt = {n: p.detach().clone() for n, p in model.dynamic_teacher.named_parameters()}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        view = model(x)  # a collective under FSDP
    state = student.state_dict()
    moved = float(sum((v.float() - w.float()).abs().sum() for v, w in zip(state.values(), before.values())))
    rank = trainer.global_rank
    torch.save({"student": state, "params": [n for n, _ in student.named_parameters()], "dt": dt, "input": x,
                "view": view}, os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"local_init_sha": local_init, "fit_start_sha": fit_start.sha, "moved": moved,
                   "steps": trainer.global_step, "extracted": extraction.metrics}, f)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode.startswith("gpd"):  # gpd_ddp, gpd_fsdp, gpd_vit_ddp, gpd_vit_fsdp
        _gpd_parallel(*mode.rsplit("_", 1), *sys.argv[2:])
    else:
        {"fill": _fill, "ddp": _ddp, "ddp_features": _ddp_features, "ddp_folder": _ddp_folder}[mode](*sys.argv[2:])
