"""GapPreservingDistillation(distill="ckd"): GPD whose static-teacher terms are the CKD loss on tuples; "kd" as
before."""

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_kd.callbacks import DynamicTeacherSharing, StudentExtraction
from lightning_kd.losses import kd_loss, soft_cross_entropy
from lightning_kd.modules import GapPreservingDistillation
from lightning_kd.reparam import extract_student
from lightning_kd.teachers import load_teacher

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import CountingTeacher, make_datamodule  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
C = 10
# Non-default weights everywhere, so that a term wired to the wrong weight changes the value.
WEIGHTS = dict(kd_weight=0.5, temperature=2.0, sce_weight=2.0, sce_smoothing=0.2)


def _batch(b, k=None, teacher=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (b,) if k is None else (b, k)
    batch = {
        "input": torch.randn(*lead, 3, 32, 32, generator=g),
        "target": torch.randint(0, C, lead, generator=g),
        "teacher_logits": torch.randn(*lead, C, generator=g) * 3,
    }
    if not teacher:
        del batch["teacher_logits"]
    return batch


def _gpd(**kw):
    torch.manual_seed(0)
    model = GapPreservingDistillation(student="resnet8", ratio=1.5, noise_std=1e-2, **kw)
    model.log_train = lambda *a, **k: None
    return model


def _trainer(tmp_path, steps, **kw):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw,
    )  # fmt: skip


# -- "kd": today's loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher", [True, False], ids=["budget", "scratch"])
def test_kd_is_the_default_and_its_loss_is_gpd_eq8(teacher):
    model = _gpd(**WEIGHTS)
    assert model.hparams.distill == "kd"
    batch = _batch(8, teacher=teacher)
    loss = model.training_step(batch, 0)  # train mode: BN batch statistics, recomputed identically below
    x, y = batch["input"], batch["target"]
    with torch.no_grad():
        z_dt, z_s = model.dynamic_teacher(x), model(x)
    loss_dt, loss_s = F.cross_entropy(z_dt, y), F.cross_entropy(z_s, y)
    if teacher:
        z_t = batch["teacher_logits"]
        loss_dt = loss_dt + 0.5 * kd_loss(z_dt, z_t, 2.0)
        loss_s = loss_s + 0.5 * kd_loss(z_s, z_t, 2.0)
    expected = loss_dt + loss_s + 2.0 * soft_cross_entropy(z_s, z_dt.softmax(1), label_smoothing=0.2)
    assert torch.equal(loss.detach(), expected)  # the same operations in the same order: bit for bit


def test_kd_weight_zero_reads_no_teacher_output():
    """GPD from scratch on a budget's samples: with kd_weight=0 the batch's teacher outputs are never read."""
    batch = _batch(8)
    batch["teacher_logits"] = torch.full_like(batch["teacher_logits"], float("nan"))
    got = _gpd(kd_weight=0.0).training_step(batch, 0)
    want = _gpd(kd_weight=0.0).training_step(_batch(8, teacher=False), 0)
    assert torch.isfinite(got) and torch.equal(got, want)


def test_test_logs_the_extracted_students_and_the_dynamic_teachers_accuracy(tmp_path):
    model = _gpd()
    with torch.no_grad():  # pull the DT away from its student, then label by the DT: the two accuracies differ
        for param in model.dynamic_teacher.parameters():
            param.add_(0.3 * torch.randn_like(param))
    model.eval()
    batches = [_batch(16, teacher=False, seed=s) for s in range(3)]
    x = torch.cat([b["input"] for b in batches])
    with torch.no_grad():
        labels = model.dynamic_teacher(x).argmax(1)
        for i, b in enumerate(batches):
            b["target"] = torch.where(torch.arange(16) % 2 == 0, labels[16 * i:16 * (i + 1)], b["target"])
        y = torch.cat([b["target"] for b in batches])
        dt_acc = (model.dynamic_teacher(x).argmax(1) == y).float().mean().item()
        student_acc = (extract_student(model.dynamic_teacher).eval()(x).argmax(1) == y).float().mean().item()
    assert dt_acc != student_acc
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    metrics = _trainer(tmp_path, steps=1).test(model, loader, verbose=False)[0]
    assert metrics["test/dt_acc"] == pytest.approx(dt_acc) and metrics["test/acc"] == pytest.approx(student_acc)


# -- "ckd": golden value ------------------------------------------------------------------------------------------
def _delta(a, p, combine, lam):
    pos, neg = a[:, :p].mean(1), a[:, p:].mean(1)
    if combine == "difference":
        return pos - neg
    if combine == "average":
        return 0.5 * pos + 0.5 * neg
    return lam * pos + (1 - lam) * neg


CASES = [(2, "mse", "difference"), (3, "mse", "difference"), (3, "kl", "difference"), (2, "mse", "mixup")]


@pytest.mark.parametrize("k, variant, combine", CASES)
def test_ckd_loss_is_gpd_with_comparative_static_teacher_terms(k, variant, combine):
    model = _gpd(distill="ckd", ckd_variant=variant, w_rel=0.7, w_cls=0.3, combine=combine, **WEIGHTS)
    model.eval()  # BN running statistics: each member's logits below equal those of the flattened forward
    b, p = 3, k - k // 2
    batch = _batch(b, k)
    torch.manual_seed(5)
    loss = model.training_step(batch, 0)
    torch.manual_seed(5)
    lam = float(torch.rand(())) if combine == "mixup" else None  # the one draw the step made for the batch
    x, y, z_t = batch["input"], batch["target"], batch["teacher_logits"]
    with torch.no_grad():
        z_dt = torch.stack([model.dynamic_teacher(x[:, j]) for j in range(k)], 1)  # (B, k, C)
        z_s = torch.stack([model(x[:, j]) for j in range(k)], 1)
    d_t = _delta(z_t, p, combine, lam)
    d_y = _delta(F.one_hot(y, C).float(), p, combine, lam)

    def distance(a, target):
        return F.mse_loss(a, target) if variant == "mse" else kd_loss(a, target, 2.0)

    def ckd(z):
        return 0.7 * distance(_delta(z, p, combine, lam), d_t) + 0.3 * distance(_delta(z, p, combine, lam), d_y)

    flat_dt, flat_s, flat_y = z_dt.flatten(0, 1), z_s.flatten(0, 1), y.flatten()
    expected = (
        (F.cross_entropy(flat_dt, flat_y) + 0.5 * ckd(z_dt))
        + (F.cross_entropy(flat_s, flat_y) + 0.5 * ckd(z_s))
        + 2.0 * soft_cross_entropy(flat_s, flat_dt.softmax(1), label_smoothing=0.2)
    )
    assert torch.allclose(loss.detach(), expected, atol=1e-5, rtol=1e-6)
    # ... and it is not the per-sample KD loss on the same samples
    per_sample = _gpd(**WEIGHTS).eval()
    kd_batch = {key: v.flatten(0, 1) for key, v in batch.items()}
    assert not torch.allclose(per_sample.training_step(kd_batch, 0), loss, atol=1e-3)


def test_ckd_trains_the_shared_parameters():
    model = _gpd(distill="ckd")
    model.training_step(_batch(4, 2), 0).backward()
    grads = [p.grad for p in model.dynamic_teacher.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# -- refusals -----------------------------------------------------------------------------------------------------
def test_ckd_refuses_plain_batches_batches_without_a_teacher_and_unknown_options():
    model = _gpd(distill="ckd")
    with pytest.raises(ValueError, match=r"distill='ckd' needs tuple batches.*group_size >= 2"):
        model.training_step(_batch(8), 0)
    with pytest.raises(ValueError, match="k >= 2"):
        model.training_step({key: v[:, :1] for key, v in _batch(4, 2).items()}, 0)  # tuples of one member
    with pytest.raises(ValueError, match="no 'teacher_logits'.*from scratch has no static teacher"):
        model.training_step(_batch(4, 2, teacher=False), 0)
    with pytest.raises(ValueError, match="distill='kd' needs plain batches"):
        _gpd().training_step(_batch(4, 2), 0)
    with pytest.raises(ValueError, match="distill must be 'kd'.*or 'ckd'"):
        GapPreservingDistillation(student="resnet8", distill="rkd")
    with pytest.raises(ValueError, match="ckd_variant"):
        GapPreservingDistillation(student="resnet8", distill="ckd", ckd_variant="l1")
    with pytest.raises(ValueError, match="combine"):
        GapPreservingDistillation(student="resnet8", distill="ckd", combine="sum")


def test_hyperparameters_record_every_argument():
    model = GapPreservingDistillation(
        student="resnet8", ratio=1.5, branches=False, distill="ckd", ckd_variant="kl", w_rel=0.5, w_cls=2.0,
        combine="average", kd_weight=0.3, lr=0.01,
    )  # fmt: skip
    h = model.hparams
    assert (h.distill, h.ckd_variant, h.w_rel, h.w_cls, h.combine) == ("ckd", "kl", 0.5, 2.0, "average")
    assert (h.student, h.ratio, h.branches, h.kd_weight, h.lr, h.sce_weight) == ("resnet8", 1.5, False, 0.3, 0.01, 3.0)


# -- a short fit on cached tuples ---------------------------------------------------------------------------------
def test_gpd_ckd_fits_on_cached_tuples_without_teacher_calls_and_extracts_the_student(tmp_path):
    teacher = CountingTeacher()
    dm = make_datamodule(teacher, tmp_path / "cache", 64, group_size=2, fill_batch_size=64)
    dm.fill()
    assert teacher.calls == 64
    invocations = teacher.invocations
    model = GapPreservingDistillation(student="resnet8", ratio=1.5, noise_std=1e-3, distill="ckd")
    before = extract_student(model.dynamic_teacher).state_dict()
    before = {name: t.clone() for name, t in before.items()}
    extraction = StudentExtraction(dirpath=str(tmp_path / "student"))
    trainer = _trainer(tmp_path, steps=3, callbacks=[DynamicTeacherSharing(check_every_n_steps=1), extraction])
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert teacher.invocations == invocations and teacher.calls == 64  # fit ran on the cache only
    assert {"val/acc", "val/dt_acc"} <= set(trainer.callback_metrics)  # 2 steps an epoch: validated once

    student = extract_student(model.dynamic_teacher).eval()
    moved = sum(float((student.state_dict()[name] - t).abs().sum()) for name, t in before.items())
    assert moved > 0  # the CKD step did train the shared weights
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (student(x) - model(x)).abs().max() <= 1e-5
        assert (load_teacher(extraction.path)(x) - model(x)).abs().max() <= 1e-5
    assert extraction.metrics["extracted/max_abs_diff"] <= 1e-5

    trainer.save_checkpoint(tmp_path / "gpd_ckd.ckpt")
    restored = GapPreservingDistillation.load_from_checkpoint(tmp_path / "gpd_ckd.ckpt", map_location="cpu")
    assert restored.hparams.distill == "ckd" and restored.hparams.ckd_variant == "mse"


# -- the shipped config -------------------------------------------------------------------------------------------
def test_gpd_ckd_config_parses_to_gpd_with_ckd_on_pairs(capsys, monkeypatch):
    import yaml

    from lightning_kd.cli import main

    monkeypatch.setattr(sys, "argv", ["lkd"])  # LightningCLI warns when both args and pytest's argv are present
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "experiments" / "cifar10" / "gpd_ckd.yaml"), "--print_config"])
    assert info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] == "lightning_kd.modules.GapPreservingDistillation"
    m = cfg["model"]["init_args"]
    assert (m["distill"], m["ckd_variant"], m["combine"]) == ("ckd", "mse", "difference")
    assert (m["w_rel"], m["w_cls"], m["ratio"]) == (1.0, 1.0, 2.0)
    assert cfg["data"]["class_path"] == "lightning_kd.data.CachedTeacherDataModule"
    assert cfg["data"]["init_args"]["group_size"] == 2
    callbacks = {c["class_path"].rsplit(".", 1)[1] for c in cfg["trainer"]["callbacks"]}
    assert {"DynamicTeacherSharing", "StudentExtraction"} <= callbacks
    model = GapPreservingDistillation(**m)
    assert model.hparams.distill == "ckd" and model.hparams.ratio == 2.0
