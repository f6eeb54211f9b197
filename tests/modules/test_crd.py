"""CRD as a KnowledgeDistillation method: trained from cached outputs only, banks over the selected samples."""

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_kd.modules import KnowledgeDistillation

sys.path.insert(0, str(Path(__file__).parents[1]))
from teachers_for_tests import CountingTeacher, make_datamodule  # noqa: E402


def trainer(tmp_path, steps=3):
    return L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path)


def test_crd_trains_from_the_cache_without_a_teacher_call_and_updates_its_banks(tmp_path):
    teacher = CountingTeacher()
    dm = make_datamodule(teacher, tmp_path / "cache", 96)
    dm.fill()
    paid = teacher.invocations
    model = KnowledgeDistillation(method="crd", student="resnet8", crd_negatives=256)
    assert model.w_rel == 0.8
    t = trainer(tmp_path)
    t.fit(model, dm)
    assert teacher.invocations == paid  # training never calls the teacher
    head = model.contrast
    assert head.n_data == 96 and head.memory_s.shape == (96, 128) and (head.z > 0).all()
    moved = (head.memory_t.norm(dim=1) - 1).abs() < 1e-5  # rows written by an update are unit vectors
    assert moved.sum() == 3 * 32  # 3 steps of 32 distinct samples (an epoch of 96) wrote 96 rows
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert any(n.startswith("contrast.embed_s") for n, _ in model.named_parameters())


def test_crd_refuses_samples_it_has_no_bank_row_for(tmp_path):
    dm = make_datamodule(CountingTeacher(), tmp_path / "cache", 64)
    model = KnowledgeDistillation(method="crd", student="resnet8", crd_negatives=16)
    trainer(tmp_path, steps=1).fit(model, dm)
    with pytest.raises(ValueError, match="memory bank for each sample selected"):
        model._crd_rows(torch.tensor([int(dm.val_indices[0])]))
