"""Feature losses (FitNet hint, VID, CC) and CKD's side comparison against hand-computed values; the heads' parts
built from shapes as the official code builds them (ConvReg, VID regressor and variances, CC embeddings)."""

import math

import pytest
import torch
from torch import nn

from lightning_kd.losses import cc_loss, compare_sides, hint_loss, match_spatial, vid_loss, vid_variance
from lightning_kd.modules.features import FeatureHead, hint_connector


def test_hint_loss_is_the_mean_squared_difference():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.0, 2.0], [5.0, 4.0]])
    assert hint_loss(student, teacher).item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss(student, teacher[:1])


def test_match_spatial_pools_the_larger_map_to_the_smaller():
    big, small = torch.arange(16.0).view(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)
    want = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).view(1, 1, 2, 2)  # means of the 2x2 blocks of 0..15
    s, t = match_spatial(big, small)
    assert torch.equal(s, want) and t is small
    s, t = match_spatial(small, big)
    assert s is small and torch.equal(t, want)


def test_vid_variance_and_loss_match_the_hand_computed_nll():
    eps = 1e-5
    log_scale = torch.tensor([math.log(math.expm1(1 - eps)), math.log(math.expm1(4 - eps))])  # variances 1 and 4
    assert torch.allclose(vid_variance(log_scale, eps), torch.tensor([1.0, 4.0]))
    mean, target = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    # channel 0: 0.5 * (1 / 1 + log 1) = 0.5; channel 1: 0.5 * (4 / 4 + log 4) = 1.1931472; mean of the two
    assert vid_loss(mean, target, log_scale, eps).item() == pytest.approx((0.5 + 0.5 * (1 + math.log(4))) / 2, rel=1e-6)


def test_cc_loss_multiplies_the_gaps_of_consecutive_samples():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
    # |gaps| = [1, 0], [0, 1], [2, 2]; sums of consecutive products: 0, 2; mean 1
    assert cc_loss(student, teacher).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="B >= 2"):
        cc_loss(student[:1], teacher[:1])


def test_compare_sides_combines_the_positive_and_negative_means():
    x = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [10.0, 0.0]]])  # k = 3: positives [:2] (mean [2, 3]), negative [2:]
    assert torch.equal(compare_sides(x), torch.tensor([[-8.0, 3.0]]))
    assert torch.equal(compare_sides(x, "average"), torch.tensor([[6.0, 1.5]]))
    assert torch.equal(compare_sides(x, "mixup", 0.25), torch.tensor([[8.0, 0.75]]))
    maps = torch.arange(16.0).view(1, 2, 2, 2, 2)  # features keep their trailing shape
    assert torch.equal(compare_sides(maps), maps[:, 0] - maps[:, 1])


@pytest.mark.parametrize("student, kind, kernel", [
    ((16, 16, 16), nn.Conv2d, (1, 1)),  # sizes match: 1x1
    ((16, 32, 32), nn.Conv2d, (3, 3)),  # twice the teacher's: 3x3 stride 2
    ((16, 8, 8), nn.ConvTranspose2d, (4, 4)),  # half: transposed 4x4 stride 2
    ((16, 18, 18), nn.Conv2d, (3, 3)),  # larger: 1 + 18 - 16
])
def test_hint_connector_is_conv_bn_relu_onto_the_teacher_shape(student, kind, kernel):
    connector = hint_connector(student, (32, 16, 16))
    conv, bn, relu = connector
    assert type(conv) is kind and conv.kernel_size == kernel and isinstance(bn, nn.BatchNorm2d)
    assert isinstance(relu, nn.ReLU)
    assert connector(torch.randn(2, *student)).shape == (2, 32, 16, 16)
    with pytest.raises(ValueError, match="no connector"):
        hint_connector((16, 4, 4), (32, 16, 16))


def test_vid_head_regresses_s_t_t_t_and_starts_at_variance_5():
    head = FeatureHead("vid", {"a": (16, 32, 32), "b": (32, 8, 8)}, {"a": (8, 16, 16), "b": (64, 8, 8)})
    convs = [m for m in head.regressors["a"] if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (16, 8, (1, 1), None), (8, 8, (1, 1), None), (8, 8, (1, 1), None)]
    assert sum(isinstance(m, nn.ReLU) for m in head.regressors["a"]) == 2
    assert torch.allclose(vid_variance(head.log_scales["b"]), torch.full((64,), 5.0))
    student = {"a": torch.randn(2, 16, 32, 32), "b": torch.randn(2, 32, 8, 8)}
    teacher = {"a": torch.randn(2, 8, 16, 16), "b": torch.randn(2, 64, 8, 8)}
    want = sum(vid_loss(head.regressors[n](match_spatial(student[n], teacher[n])[0]), match_spatial(
        student[n], teacher[n])[1], head.log_scales[n]) for n in student)
    assert torch.allclose(head(student, teacher), want)


def test_cc_head_embeds_both_flattened_features_to_128():
    head = FeatureHead("cc", {"pool": (64, 1, 1)}, {"pool": (32, 1, 1)})
    assert (head.embed_s.in_features, head.embed_s.out_features) == (64, 128)
    assert (head.embed_t.in_features, head.embed_t.out_features) == (32, 128)
    s, t = torch.randn(4, 64, 1, 1), torch.randn(4, 32, 1, 1)
    want = cc_loss(head.embed_s(s.flatten(1)), head.embed_t(t.flatten(1)))
    assert torch.allclose(head({"pool": s}, {"pool": t}), want)
    with pytest.raises(ValueError, match="pairs one feature by name"):
        FeatureHead("cc", {"a": (4,), "b": (4,)}, {"a": (4,), "b": (4,)})
