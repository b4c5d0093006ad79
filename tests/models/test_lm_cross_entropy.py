"""lm_cross_entropy against the oracle F.cross_entropy(ignore_index=-100): values and gradients."""

import torch
import torch.nn.functional as F

from moelab.models.transformer import _LMCrossEntropy, lm_cross_entropy


def test_matches_torch_cross_entropy_values_and_gradients(monkeypatch):
    monkeypatch.setattr(_LMCrossEntropy, "CHUNK_ELEMS", 40)  # several log-sum-exp chunks
    torch.manual_seed(0)
    for T, V in [(1, 5), (7, 13), (33, 17)]:
        logits = (3 * torch.randn(T, V, dtype=torch.float64)).requires_grad_()
        targets = torch.randint(0, V, (T,))
        targets[::3] = -100
        if T == 1:
            targets[0] = 2
        ours = lm_cross_entropy(logits, targets)
        (g_ours,) = torch.autograd.grad(1.7 * ours, logits)
        ref = F.cross_entropy(logits, targets, ignore_index=-100)
        (g_ref,) = torch.autograd.grad(1.7 * ref, logits)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(g_ours, g_ref)


def test_all_ignored_is_nan_with_zero_gradient():
    logits = torch.randn(4, 9, requires_grad=True)
    loss = lm_cross_entropy(logits, torch.full((4,), -100))
    assert torch.isnan(loss)
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_without_gradient_matches_and_keeps_no_buffer(monkeypatch):
    monkeypatch.setattr(_LMCrossEntropy, "CHUNK_ELEMS", 30)
    torch.manual_seed(1)
    logits = 5 * torch.randn(21, 11)
    targets = torch.randint(0, 11, (21,))
    targets[2] = -100
    with torch.no_grad():
        ours = lm_cross_entropy(logits, targets)
    torch.testing.assert_close(ours, F.cross_entropy(logits, targets, ignore_index=-100))


def test_large_logits_stay_finite():
    logits = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 1e4, 3.0]], requires_grad=True)
    targets = torch.tensor([0, 2])
    ours = lm_cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.detach(), targets)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    assert torch.isfinite(logits.grad).all()


def test_second_backward_through_one_loss_is_refused():
    import pytest

    logits = torch.randn(3, 4, requires_grad=True)
    loss = lm_cross_entropy(logits, torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
