"""GapPreservingDistillation.configure_model under ModelParallelStrategy, checked without spawning processes: a fake
device mesh stands in for the one Lightning hands the module."""

import pytest
import torch

from lightning_kd.modules import GapPreservingDistillation


class _FakeMesh:
    """What ``configure_model`` reads of a DeviceMesh: ``mesh[dim].size()`` (and nothing collective)."""

    def __init__(self, data_parallel: int, tensor_parallel: int) -> None:
        self.sizes = {"data_parallel": data_parallel, "tensor_parallel": tensor_parallel}

    def __getitem__(self, dim: str) -> "_FakeDim":
        return _FakeDim(self.sizes[dim])


class _FakeDim:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def get_group(self):
        raise AssertionError("configure_model must refuse tensor parallelism before any collective")


@pytest.mark.parametrize("student,kwargs", [
    ("resnet8", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2}),
])  # fmt: skip
def test_gpd_refuses_tensor_parallelism_and_names_the_fix(student, kwargs):
    model = GapPreservingDistillation(student=student, model_kwargs=kwargs, ratio=2.0, branches=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model._device_mesh = _FakeMesh(data_parallel=1, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1") as err:
        model.configure_model()
    assert "ModelParallelStrategy(data_parallel_size=" in str(err.value)
    after = model.state_dict()  # refused before touching (moving, broadcasting or sharding) the dynamic teacher
    assert after.keys() == before.keys() and all(after[k].equal(before[k]) for k in before)


def test_gpd_configure_model_is_a_no_op_without_a_device_mesh():
    model = GapPreservingDistillation(student="resnet8", ratio=2.0, branches=False)
    assert model.device_mesh is None
    model.configure_model()  # DDP, single device: nothing to shard


def test_gpd_starts_from_the_student_that_kd_starts_from_under_one_seed():
    """One seed, one initial student: GPD's dynamic teacher is built from the student StudentModule drew, not a
    second draw, so equal-seed comparisons with KD / CE start from the same weights."""
    from lightning_kd.modules import GapPreservingDistillation, KnowledgeDistillation
    from lightning_kd.reparam import extract_student

    torch.manual_seed(0)
    kd = KnowledgeDistillation(student="resnet8")
    torch.manual_seed(0)
    gpd = GapPreservingDistillation(student="resnet8", noise_std=0.0)
    start = extract_student(gpd.dynamic_teacher).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in kd.student.state_dict().items())
