"""Feature-level CKD and the white-box baselines: their losses as composed, heads built before the optimizer and
trained by it, student features by hooks (zoo and timm), the teacher's view option, and no teacher forward after
the fill."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_kd.losses import compare_sides, kd_loss, tuple_comparative_loss
from lightning_kd.models.hooks import capture
from lightning_kd.modules import ComparativeDistillation, KnowledgeDistillation

sys.path.insert(0, str(Path(__file__).parents[1]))
from features_for_tests import CountingNet, feature_datamodule  # noqa: E402

TEACHER_LAYERS = {"hint": {"l2": "net.layer2"}, "vid": {"s1": "net.layer1", "l2": "net.layer2", "s3": "net.layer3"},
                  "cc": {"pool": "net.avgpool"}}
STUDENT_LAYERS = {"hint": {"l2": "layer2"}, "vid": {"s1": "layer1", "l2": "layer2", "s3": "layer3"},
                  "cc": {"pool": "avgpool"}}
SHAPES = {"l2": (32, 16, 16), "s1": (16, 32, 32), "s3": (64, 8, 8), "pool": (64, 1, 1)}


def _batch(b=4, k=None, views=False):
    g = torch.Generator().manual_seed(0)
    lead = (b,) if k is None else (b, k)
    batch = {"index": torch.arange(b * (k or 1)).view(lead), "input": torch.randn(*lead, 3, 32, 32, generator=g),
             "target": torch.randint(0, 10, lead, generator=g), "teacher_logits": torch.randn(*lead, 10, generator=g),
             "teacher_features": {n: torch.randn(*lead, *s, generator=g) for n, s in SHAPES.items()}}
    if views:
        batch["teacher_view"] = torch.randn(*lead, 3, 32, 32, generator=g)
    return batch


def _module(kind: str, loss: str, **kw):
    if kind == "kd":
        model = KnowledgeDistillation(method=loss, student_features=STUDENT_LAYERS[loss], **kw)
    else:
        model = ComparativeDistillation(feature_loss=loss, student_features=STUDENT_LAYERS[loss], **kw)
    model.build_feature_head((3, 32, 32), SHAPES)
    model.log_train = lambda *a, **k: None
    return model.eval()  # BN in eval mode: the step's forward and the one below agree


@pytest.mark.parametrize("loss, weight", [("hint", 100.0), ("vid", 1.0), ("cc", 0.02)])
def test_white_box_baseline_is_ce_plus_kd_plus_the_weighted_feature_loss(loss, weight):
    model, batch = _module("kd", loss), _batch()
    got = model.training_step(batch, 0)
    with capture(model.student, STUDENT_LAYERS[loss]) as feats:
        logits = model.student(batch["input"])
    z_t, y = batch["teacher_logits"], batch["target"]
    want = F.cross_entropy(logits, y) + kd_loss(logits, z_t, 4.0) + weight * model.feature_head(
        feats, {n: batch["teacher_features"][n] for n in feats})
    assert model.w_feat == weight and torch.allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("loss", ["hint", "vid", "cc"])
@pytest.mark.parametrize("combine", ["difference", "mixup"])
def test_feature_ckd_adds_the_loss_of_the_side_differences_to_both_logit_terms(loss, combine):
    model, batch = _module("ckd", loss, combine=combine), _batch(k=3)
    torch.manual_seed(3)
    got = model.training_step(batch, 0)
    torch.manual_seed(3)
    lam = float(torch.rand(())) if combine == "mixup" else None  # the one draw of the step
    with capture(model.student, STUDENT_LAYERS[loss]) as feats:
        z = model.student(batch["input"].flatten(0, 1))
    logit_terms = tuple_comparative_loss(z.view(4, 3, -1), batch["teacher_logits"], batch["target"], combine=combine,
                                         lam=lam)
    student = {n: compare_sides(f.view(4, 3, *f.shape[1:]), combine, lam) for n, f in feats.items()}
    teacher = {n: compare_sides(batch["teacher_features"][n], combine, lam) for n in feats}
    want = logit_terms + model.w_feat * model.feature_head(student, teacher)
    assert torch.allclose(got, want, rtol=1e-5)


def test_feature_view_teacher_takes_the_student_features_from_the_teachers_view():
    batch = _batch(views=True)
    model = _module("kd", "hint", feature_view="teacher")
    got = model.training_step(batch, 0)
    logits = model.student(batch["input"])
    with capture(model.student, {"l2": "layer2"}) as on_view:
        model.student(batch["teacher_view"])
    z_t, y = batch["teacher_logits"], batch["target"]
    want = F.cross_entropy(logits, y) + kd_loss(logits, z_t, 4.0) + 100 * model.feature_head(
        on_view, {"l2": batch["teacher_features"]["l2"]})
    assert torch.allclose(got, want, rtol=1e-5)
    assert not torch.allclose(got, _module("kd", "hint").training_step(batch, 0))  # the view matters
    del batch["teacher_view"]
    with pytest.raises(ValueError, match="serve_teacher_view=True"):
        model.training_step(batch, 0)


def test_timm_student_features_by_hooks_and_a_transposed_connector():
    model = KnowledgeDistillation(method="hint", student="resnet18", student_features={"l2": "layer1"})
    model.build_feature_head((3, 32, 32), SHAPES)  # timm resnet18 at 32 px: layer1 is 8x8, the teacher's map 16x16
    assert isinstance(model.feature_head.connector[0], torch.nn.ConvTranspose2d)
    model.log_train = lambda *a, **k: None
    model.training_step(_batch(), 0).backward()
    assert all(p.grad is not None for p in model.feature_head.parameters())
    with pytest.raises(ValueError, match="has no layer 'layer9'"):
        KnowledgeDistillation(method="hint", student_features={"l2": "layer9"}).build_feature_head((3, 32, 32), SHAPES)
    with pytest.raises(ValueError, match=r"names \['l9'\].*cached teacher features are"):
        KnowledgeDistillation(method="hint", student_features={"l9": "layer2"}).build_feature_head((3, 32, 32), SHAPES)


def _trainer(tmp_path, steps=3):
    return L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path)


@pytest.mark.parametrize("kind, loss", [("kd", "hint"), ("kd", "vid"), ("kd", "cc"), ("ckd", "hint"), ("ckd", "vid"),
                                        ("ckd", "cc"), ("kd", "crd")])
def test_no_teacher_forward_after_the_fill_and_the_head_trains_with_the_student(tmp_path, kind, loss):
    teacher = CountingNet()
    dm = feature_datamodule(teacher, tmp_path / "cache", budget=48, group_size=2 if kind == "ckd" else 1,
                            teacher_features=TEACHER_LAYERS.get(loss, {}))
    if loss == "crd":
        model = KnowledgeDistillation(method="crd", crd_negatives=64)
    elif kind == "kd":
        model = KnowledgeDistillation(method=loss, student_features=STUDENT_LAYERS[loss])
    else:
        model = ComparativeDistillation(feature_loss=loss, student_features=STUDENT_LAYERS[loss])
    trainer = _trainer(tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert teacher.samples == 48  # the fill's one call per sample; training steps and validation: none
    head = model.contrast if loss == "crd" else model.feature_head
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in head.parameters() if p.requires_grad} <= in_optimizer
    if loss != "crd":
        path = tmp_path / "last.ckpt"
        trainer.save_checkpoint(path)
        loaded = type(model).load_from_checkpoint(path)  # the head is rebuilt from the shapes saved with it
        for (name, a), b in zip(model.feature_head.state_dict().items(), loaded.feature_head.state_dict().values()):
            assert torch.equal(a, b), name


def test_a_feature_method_without_cached_features_says_what_to_set(tmp_path):
    dm = feature_datamodule(CountingNet(), tmp_path / "cache", budget=16, teacher_features={})
    with pytest.raises(ValueError, match=r"teacher_features=\{name: teacher layer\}"):
        _trainer(tmp_path).fit(KnowledgeDistillation(method="hint", student_features={"l2": "layer2"}), dm)
    with pytest.raises(ValueError, match="needs student_features"):
        ComparativeDistillation(feature_loss="vid")
    with pytest.raises(ValueError, match="pairing='tuples'"):
        ComparativeDistillation(feature_loss="cc", student_features={"pool": "avgpool"}, pairing="in_batch")


def test_ckd_hint_config_parses_to_feature_ckd_on_the_shared_teachers_layer_2(capsys, monkeypatch):
    import yaml

    from lightning_kd.cli import main

    monkeypatch.setattr(sys, "argv", ["lkd"])  # LightningCLI warns when both args and pytest's argv are present
    config = Path(__file__).parents[2] / "experiments" / "cifar10" / "ckd_hint.yaml"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert cfg["model"]["class_path"] == "lightning_kd.modules.ComparativeDistillation"
    assert (m["feature_loss"], m["student_features"], m["feature_view"]) == ("hint", {"layer2": "layer2"}, "student")
    assert d["teacher"]["model"] == "resnet20_rgb" and d["group_size"] == 2
    assert d["teacher_features"] == {"layer2": "net.layer2"}
    model = ComparativeDistillation(**m)
    assert model.w_feat == 100.0 and model.student_features == {"layer2": "layer2"}


@pytest.mark.ddp
def test_feature_ckd_under_ddp_pays_once_and_trains_one_student_and_head(tmp_path):
    """2 DDP ranks seeded differently: the fill splits the budget between them (each sample computed once), both
    ranks then hold the same logits and features, and the feature head trains in sync with the student."""
    import json

    from teachers_for_tests import run_helper

    out = tmp_path / "out"
    out.mkdir()
    proc = run_helper("ddp_features", out, tmp_path / "cache", 64, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["samples"] + r1["samples"] == 64 and r0["samples"] > 0 and r1["samples"] > 0
    assert r0["cached"] == r1["cached"] == r0["budget_used"] == 64
    assert r0["cache_sha"] == r1["cache_sha"]
    assert r0["feature_shapes"] == r1["feature_shapes"] == {"l2": [64, 32, 16, 16], "pool": [64, 64, 1, 1]}
    assert r0["head_params"] > 0 and r0["steps"] == r1["steps"] == 2
    assert r0["trained_sha"] == r1["trained_sha"]
