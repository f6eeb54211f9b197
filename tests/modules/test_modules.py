import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_kd.callbacks import DynamicTeacherSharing, StudentExtraction, TeacherBudgetMonitor
from lightning_kd.losses import comparative_kd_loss, hinton_kd_loss
from lightning_kd.modules import ComparativeDistillation, GapPreservingDistillation, KnowledgeDistillation, Supervised
from lightning_kd.reparam.extract import extract_student
from lightning_kd.teachers import load_teacher

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import CountingTeacher, make_datamodule  # noqa: E402


def _trainer(tmp_path, steps=2, **kw):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=1, limit_test_batches=1, logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw,
    )


def _batch(b=8, k=None, c=10):
    g = torch.Generator().manual_seed(0)
    lead = (b,) if k is None else (b, k)
    return {
        "index": torch.arange(b * (k or 1)).view(lead),
        "input": torch.randn(*lead, 3, 32, 32, generator=g),
        "target": torch.randint(0, c, lead, generator=g),
        "teacher_logits": torch.randn(*lead, c, generator=g) * 3,
    }


def test_kd_training_step_is_hinton_kd_on_the_cached_logits():
    model = KnowledgeDistillation(student="resnet8", alpha=0.3, temperature=2.0)
    batch = _batch()
    model.log_train = lambda *a, **k: None
    torch.manual_seed(0)
    loss = model.training_step(batch, 0)
    expected = hinton_kd_loss(model(batch["input"]), batch["teacher_logits"], batch["target"], 0.3, 2.0)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_ckd_training_step_splits_tuples_into_positive_and_negative_sides():
    model = ComparativeDistillation(student="resnet8")
    model.eval()  # BN in eval mode: the per-member forward below must match the batched one
    model.log_train = lambda *a, **k: None
    batch = _batch(b=4, k=3)
    loss = model.training_step(batch, 0)
    z = torch.stack([model(batch["input"][:, j]) for j in range(3)], 1)
    zt, y = batch["teacher_logits"], batch["target"]
    expected = comparative_kd_loss(z[:, :2], z[:, 2:], zt[:, :2], zt[:, 2:], y[:, :2], y[:, 2:])
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("combine", ["average", "mixup"])
def test_ckd_ablations_combine_the_sides_as_asked_with_one_lambda_per_batch(combine):
    model = ComparativeDistillation(student="resnet8", combine=combine, variant="kl")
    model.eval()
    model.log_train = lambda *a, **k: None
    batch = _batch(b=4, k=2)
    torch.manual_seed(7)
    loss = model.training_step(batch, 0)
    torch.manual_seed(7)
    lam = float(torch.rand(())) if combine == "mixup" else None  # the draw the step made
    z = torch.stack([model(batch["input"][:, j]) for j in range(2)], 1)
    zt, y = batch["teacher_logits"], batch["target"]
    expected = comparative_kd_loss(z[:, :1], z[:, 1:], zt[:, :1], zt[:, 1:], y[:, :1], y[:, 1:], variant="kl",
                                   combine=combine, lam=lam)
    assert torch.allclose(loss, expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs combine='difference'"):
        ComparativeDistillation(student="resnet8", combine=combine, pairing="in_batch")


def test_ckd_refuses_plain_batches_with_a_clear_error():
    model = ComparativeDistillation(student="resnet8")
    with pytest.raises(ValueError, match="group_size"):
        model.training_step(_batch(), 0)


@pytest.mark.parametrize("method", ["kd", "mixup", "cutmix", "rkd", "dist"])
def test_every_baseline_trains(method):
    model = KnowledgeDistillation(student="resnet8", method=method)
    model.log_train = lambda *a, **k: None
    loss = model.training_step(_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.student.parameters())


def test_ckd_costs_no_teacher_call_beyond_the_cache_fill(tmp_path):
    teacher = CountingTeacher()
    dm = make_datamodule(teacher, tmp_path / "cache", 128, group_size=2, fill_batch_size=64)
    trainer = _trainer(tmp_path, steps=6, callbacks=[TeacherBudgetMonitor()])
    model = ComparativeDistillation(student="resnet8")
    trainer.fit(model, dm)
    assert teacher.calls == 128 and trainer.global_step == 6
    trainer.test(model, datamodule=dm, verbose=False)
    assert teacher.calls == 128  # training, validation and test cost nothing more


def test_gpd_from_scratch_without_a_teacher_and_extraction(tmp_path):
    from lightning_kd.data import CIFAR10DataModule

    dm = CIFAR10DataModule(batch_size=16, val_size=64)
    model = GapPreservingDistillation(student="resnet8", ratio=1.5, branches=True)
    extraction = StudentExtraction(dirpath=str(tmp_path))
    _trainer(tmp_path, steps=3, callbacks=[DynamicTeacherSharing(check_every_n_steps=1), extraction]).fit(model, dm)
    student = load_teacher(extraction.path)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert (student(x) - model(x)).abs().max() <= 1e-5
    assert extraction.metrics["extracted/max_abs_diff"] <= 1e-5
    assert 0 <= extraction.metrics["extracted/val_acc"] <= 1


def test_gpd_under_a_teacher_budget_uses_the_cached_outputs(tmp_path):
    teacher = CountingTeacher()
    dm = make_datamodule(teacher, tmp_path / "cache", 64, fill_batch_size=64)
    model = GapPreservingDistillation(student="resnet8", ratio=2.0, branches=False, sce_weight=3.0)
    _trainer(tmp_path, steps=2).fit(model, dm)
    assert teacher.calls == 64
    batch = next(iter(dm.train_dataloader()))
    model.log_train = lambda *a, **k: None
    model.eval()
    loss = model.training_step(batch, 0)
    z_dt, z_s = model.dynamic_teacher(batch["input"]), model(batch["input"])
    y, z_t = batch["target"], batch["teacher_logits"]
    from lightning_kd.losses import kd_loss, soft_cross_entropy

    expected = (
        F.cross_entropy(z_dt, y) + kd_loss(z_dt, z_t) + F.cross_entropy(z_s, y) + kd_loss(z_s, z_t)
        + 3.0 * soft_cross_entropy(z_s, z_dt.softmax(1), label_smoothing=0.1)
    )
    assert torch.allclose(loss, expected, atol=1e-5)


# A 2-block ViT at 32x32 (patch 8, 3 heads of 16), built by name through timm with model_kwargs.
VIT = {
    "student": "vit_tiny_patch16_224",
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2},
}


def test_gpd_vit_from_scratch_keeps_sharing_and_extracts_the_timm_class(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from lightning_kd.data import CIFAR10DataModule

    dm = CIFAR10DataModule(batch_size=16, val_size=64)
    model = GapPreservingDistillation(**VIT, ratio=1.5, noise_std=1e-3, optimizer="adamw", lr=1e-3)
    assert model.dynamic_teacher.model.blocks[0].attn.num_heads == 5
    extraction = StudentExtraction(dirpath=str(tmp_path))
    _trainer(tmp_path, steps=3, callbacks=[DynamicTeacherSharing(check_every_n_steps=1), extraction]).fit(model, dm)
    student = load_teacher(extraction.path)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert (student(x) - model(x)).abs().max() <= 1e-5
    assert extraction.metrics["extracted/max_abs_diff"] <= 1e-5
    assert type(extraction.student) is VisionTransformer


def test_gpd_vit_under_a_teacher_budget_and_fine_tuning(tmp_path):
    teacher = CountingTeacher()
    dm = make_datamodule(teacher, tmp_path / "cache", 64, fill_batch_size=64)
    model = GapPreservingDistillation(**VIT, ratio=2.0, optimizer="adamw", lr=1e-3)
    _trainer(tmp_path, steps=2).fit(model, dm)
    assert teacher.calls == 64
    trained = model.dynamic_teacher.student_state_dict()
    torch.save(trained, tmp_path / "vit.pt")
    tuned = GapPreservingDistillation(**VIT, ratio=3.0, noise_std=0.0, student_weights=str(tmp_path / "vit.pt"))
    tuned.eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the fine-tuning DT starts as the trained student, in both of its modes
        assert (tuned(x) - model(x)).abs().max() <= 1e-5
        assert (tuned.dynamic_teacher(x) - model(x)).abs().max() <= 1e-5


def test_supervised_checkpoint_loads_as_a_teacher(tmp_path):
    from lightning_kd.data import CIFAR10DataModule

    model = Supervised(student="resnet8", label_smoothing=0.1)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(model, CIFAR10DataModule(batch_size=8, val_size=16))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    teacher = load_teacher(tmp_path / "m.ckpt")
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(teacher(x), model(x))


@pytest.fixture(scope="module")
def gpd_run(tmp_path_factory):
    """``run(student, strategy)``: GPD trained 3 steps on 2 CPU processes (gloo) under ``"ddp"`` or ``"fsdp"``
    (FSDP2: ``ModelParallelStrategy``), once per student and strategy in this module; returns its output folder."""
    from teachers_for_tests import run_helper

    runs = {}

    def run(student: str, strategy: str) -> Path:
        mode = f"{'gpd' if student == 'resnet8' else 'gpd_vit'}_{strategy}"
        if mode not in runs:
            out = tmp_path_factory.mktemp(mode)
            proc = run_helper(mode, out, out / "cache", 128, cwd=out)
            assert proc.returncode == 0, proc.stderr[-3000:]  # DynamicTeacherSharing raises if sharing breaks
            runs[mode] = out
        return runs[mode]

    return run


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("student", ["resnet8", "vit"])
def test_gpd_on_2_processes_keeps_sharing_and_extracts_the_same_student_on_every_rank(gpd_run, student, strategy):
    import json

    out = gpd_run(student, strategy)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    s0, s1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the ranks initialised differently; both start from rank zero's DT (FSDP2 would keep each rank's own chunk)
    assert r0["local_init_sha"] != r1["local_init_sha"]
    assert r0["fit_start_sha"] == r1["fit_start_sha"] == r0["local_init_sha"]
    assert r0["steps"] == r1["steps"] == 3 and r0["moved"] > 0  # training changed the shared weights
    # each rank extracts the same parameters from the full DT (BN running statistics are per rank, as in DDP)
    assert all(torch.equal(s0["student"][k], s1["student"][k]) for k in s0["params"])
    saved = torch.load(out / "student.ckpt", weights_only=True)["state_dict"]
    assert saved.keys() == {f"student.{k}" for k in s0["student"]}
    assert all(torch.equal(saved[f"student.{k}"], v) for k, v in s0["student"].items())  # rank zero's, stats too
    teacher = load_teacher(out / "student.ckpt")
    assert (teacher(s0["input"]) - s0["view"]).abs().max() <= 1e-5  # the checkpoint is rank zero's student view
    assert r0["extracted"]["extracted/max_abs_diff"] <= 1e-5 and not r1["extracted"]  # evaluated on rank zero


@pytest.mark.ddp
@pytest.mark.parametrize("student", ["resnet8", "vit"])
def test_gpd_under_fsdp_trains_the_dynamic_teacher_that_ddp_trains(gpd_run, student):
    """Same data, same initial DT: FSDP2's reduce-scatter averages the gradients as DDP's all-reduce does."""
    fsdp, ddp = (torch.load(gpd_run(student, s) / "rank0.pt", weights_only=True)["dt"] for s in ("fsdp", "ddp"))
    assert fsdp.keys() == ddp.keys()
    for name in fsdp:  # float summation order differs; measured 2.0e-4 (resnet8, SGD), 7.1e-6 (ViT, AdamW)
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=0, atol=1e-3, msg=name)


def test_lkd_cache_fills_without_training(tmp_path, monkeypatch):
    from lightning_kd.cache import TeacherCache
    from lightning_kd.cli import main

    monkeypatch.chdir(Path(__file__).parents[2])
    main([
        "cache", "--config", "experiments/cifar10/kd_budget.yaml", "--data.init_args.budget", "40",
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.progress", "false",
        "--trainer.logger", "false",
    ])
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == 40 and cache.spec.teacher.startswith("sha256:")
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_train_acc_logged_once_per_epoch_is_the_accuracy_over_every_step_of_that_epoch(tmp_path):
    """log_train hands the metric to self.log on an epoch's first step only; the logged value must still be the
    accuracy over all of the epoch's batches, and a new epoch must start from zero."""
    batches = [_batch(b=16) for _ in range(3)]
    for i, b in enumerate(batches):
        b["target"] = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(i))
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    class Recorder(KnowledgeDistillation):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.setdefault(self.current_epoch, []).append((self.last_logits, batch["target"]))
            return loss

        def log_train(self, loss, logits, target, **terms):
            self.last_logits = logits.detach().clone()
            super().log_train(loss, logits, target, **terms)

    logged: dict[int, float] = {}

    class Grab(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            logged[trainer.current_epoch] = float(trainer.callback_metrics["train/acc"])

    model = Recorder(student="resnet8", lr=0.1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Grab()], default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=loader)
    for epoch in (0, 1):
        correct = sum(int((z.argmax(1) == y).sum()) for z, y in seen[epoch])
        assert logged[epoch] == pytest.approx(correct / 48, abs=1e-6), epoch


@pytest.mark.parametrize(
    "make",
    [
        lambda **k: Supervised(student="resnet8", **k),
        lambda **k: KnowledgeDistillation(student="resnet8", **k),
        lambda **k: ComparativeDistillation(student="resnet8", **k),
        lambda **k: GapPreservingDistillation(student="resnet8", ratio=1.5, **k),
    ],
    ids=["ce", "kd", "ckd", "gpd"],
)
def test_channels_last_is_the_same_function_and_the_same_step(make):
    torch.manual_seed(0)
    ref = make()
    fast = make(channels_last=True)
    fast.load_state_dict(ref.state_dict())
    convs = [p for p in fast.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for m in (ref, fast):
        m.log_train = lambda *a, **k: None
    batch = _batch(8, k=2) if isinstance(ref, ComparativeDistillation) else _batch(8)
    losses = [m.training_step(batch, 0) for m in (ref, fast)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for loss in losses:
        loss.backward()
    grads = [dict((n, p.grad) for n, p in m.named_parameters() if p.grad is not None) for m in (ref, fast)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-4, rtol=1e-4), n
    x = torch.randn(4, 3, 32, 32)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert (ref(x) - fast(x)).abs().max() <= 1e-5
        if isinstance(fast, GapPreservingDistillation):
            student = extract_student(fast.dynamic_teacher)
            assert (student(x) - fast(x)).abs().max() <= 1e-5
