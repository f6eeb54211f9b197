"""CRD: the NCE loss, scores and bank updates against hand-computed values; the head's negatives and state."""

import math

import numpy as np
import pytest
import torch

from lightning_kd.losses.contrastive import contrast_scores, l2_normalize, momentum_rows, nce_loss
from lightning_kd.modules.contrast import ContrastHead


def test_nce_loss_matches_the_hand_computed_value():
    scores = torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.4, 0.05]])
    noise = 2 / 4  # K = 2 negatives, N = 4 samples
    want = -sum(math.log(p[0] / (p[0] + noise)) + sum(math.log(noise / (q + noise)) for q in p[1:])
                for p in scores.tolist()) / 2
    assert nce_loss(scores, 4, eps=0.0).item() == pytest.approx(want, rel=1e-6)


def test_contrast_scores_are_exp_dot_over_temperature():
    memory, anchor = torch.randn(6, 4), torch.randn(2, 4)
    rows = torch.tensor([[0, 3, 5], [1, 1, 2]])
    got = contrast_scores(anchor, memory, rows, 0.5)
    for b in range(2):
        for j in range(3):
            assert got[b, j].item() == pytest.approx(math.exp(float(memory[rows[b, j]] @ anchor[b]) / 0.5), rel=1e-5)


@pytest.mark.parametrize("n_rows", [5, 300])  # fewer bank rows than draws (scored whole), and more (gathered)
def test_contrast_scores_and_their_gradient_equal_the_gathered_reference(n_rows):
    torch.manual_seed(0)
    memory, anchor = torch.randn(n_rows, 8), torch.randn(3, 8, requires_grad=True)
    rows, weights = torch.randint(n_rows, (3, 11)), torch.randn(3, 11)
    got = contrast_scores(anchor, memory, rows, 0.5)
    (got * weights).sum().backward()
    got_grad, anchor.grad = anchor.grad, None
    want = torch.exp(torch.einsum("bkd,bd->bk", memory[rows], anchor) / 0.5)  # repeated rows: repeated draws
    (want * weights).sum().backward()
    assert torch.allclose(got, want, rtol=1e-5) and torch.allclose(got_grad, anchor.grad, rtol=1e-5, atol=1e-6)


def test_bank_rows_move_towards_the_new_embedding_and_stay_unit():
    memory = l2_normalize(torch.randn(5, 3))
    v = l2_normalize(torch.randn(2, 3))
    rows = torch.tensor([4, 1])
    got = momentum_rows(memory, rows, v, 0.5)
    want = (0.5 * memory[rows] + 0.5 * v) / (0.5 * memory[rows] + 0.5 * v).norm(dim=1, keepdim=True)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.norm(dim=1), torch.ones(2))


def test_head_draws_negatives_of_other_classes_and_the_positive_first():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    head = ContrastHead(10, labels, dim=8, negatives=50)
    rows = torch.tensor([0, 2, 6])
    drawn = head.sample_rows(rows, torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 51) and torch.equal(drawn[:, 0], rows)
    for b, r in enumerate(rows.tolist()):
        assert (torch.as_tensor(labels)[drawn[b, 1:]] != labels[r]).all()


def test_head_sets_its_normalisers_once_updates_its_banks_and_trains_only_the_student_side():
    torch.manual_seed(0)
    head = ContrastHead(10, np.arange(12) % 3, dim=8, negatives=20)
    z_s = torch.randn(4, 10, requires_grad=True)
    z_t = torch.randn(4, 10, requires_grad=True)
    rows = torch.tensor([0, 5, 7, 11])
    before = head.memory_s.clone()
    loss = head(z_s, z_t, rows)
    z = head.z.clone()
    assert torch.isfinite(loss) and (z > 0).all()
    loss.backward()
    assert z_s.grad.abs().sum() > 0 and z_t.grad is None  # the teacher's logits are targets
    assert head.embed_s.weight.grad is not None and head.embed_t.weight.grad is not None
    changed = (head.memory_s != before).any(1)
    assert torch.equal(changed.nonzero().flatten(), rows)
    head(torch.randn(4, 10), torch.randn(4, 10), rows)
    assert torch.equal(head.z, z)  # fixed at the first batch


def test_head_refuses_a_single_class():
    with pytest.raises(ValueError, match="only one class"):
        ContrastHead(10, np.zeros(5, dtype=int))
