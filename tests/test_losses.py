import math

import numpy as np
import pytest
import torch
from scipy.special import digamma, softmax

from uml.config import LossParams
from uml.evidential import one_hot
from uml.losses import kl_annealing, mutual_loss, segmentation_loss, soft_log_dice, uml_loss


def test_kl_annealing_schedule():
    assert [kl_annealing(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError):
        kl_annealing(0, 0)


def test_soft_log_dice_perfect_and_disjoint():
    target = torch.randint(0, 3, (2, 16, 16))
    perfect = one_hot(target, 3)
    assert float(soft_log_dice(perfect, perfect)) == pytest.approx(0.0, abs=1e-5)
    # Predict class (c + 1) mod 3 everywhere: no overlap, every class term is -log(eps / (...)).
    wrong = one_hot((target + 1) % 3, 3)
    assert float(soft_log_dice(wrong, perfect)) > 10


def test_soft_log_dice_hand_computed():
    # One class half right: p = [1, 1, 0, 0], g = [1, 0, 0, 0] -> 2*1 / (2 + 1) for class 1.
    prob = torch.tensor([[[[0.0, 0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]]]])  # (1, 2, 1, 4)
    target = torch.tensor([[[0.0, 1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0, 0.0]]]).unsqueeze(0)
    expected = -(math.log((2 * 2 + 1e-5) / (2 + 3 + 1e-5)) + math.log((2 * 1 + 1e-5) / (2 + 1 + 1e-5))) / 2
    assert float(soft_log_dice(prob, target)) == pytest.approx(expected, rel=1e-6)


def test_segmentation_loss_averages_deep_supervision_at_full_size():
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[:, 2:6, 2:6] = 1
    good = torch.full((1, 2, 8, 8), -20.0)
    good[:, 0][mask == 0] = 20.0
    good[:, 1][mask == 1] = 20.0
    bad_low_res = torch.zeros(1, 2, 2, 2)  # uninformative side output, upsampled to 8x8
    only_good = segmentation_loss([good], mask)
    mixed = segmentation_loss([good, bad_low_res], mask)
    alone_bad = segmentation_loss([bad_low_res], mask)
    assert float(only_good) < 1e-3
    assert float(mixed) == pytest.approx((float(only_good) + float(alone_bad)) / 2, rel=1e-5)


def _numpy_log_dice(prob: np.ndarray, mask: np.ndarray, num_classes: int) -> float:
    """The published soft log-Dice written out in numpy: sums over batch and pixels per class."""
    terms = []
    for k in range(num_classes):
        g = (mask == k).astype(np.float64)
        p = prob[:, k].astype(np.float64)
        terms.append(-math.log((2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5)))
    return float(np.mean(terms))


def test_segmentation_loss_is_dice_on_the_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6) * 2
    mask = torch.randint(0, 3, (2, 6, 6))
    expected = _numpy_log_dice(softmax(logits.numpy(), axis=1), mask.numpy(), 3)
    assert float(segmentation_loss([logits], mask)) == pytest.approx(expected, rel=1e-5)
    # Not the Dirichlet mean of softplus evidence, which an evidential navigator would use.
    evidence = np.log1p(np.exp(logits.numpy()))
    dirichlet_mean = (evidence + 1) / (evidence + 1).sum(axis=1, keepdims=True)
    assert abs(_numpy_log_dice(dirichlet_mean, mask.numpy(), 3) - expected) > 0.01


@pytest.mark.parametrize("kl_weight", [0.0, 0.7])
def test_mutual_loss_dice_on_softmax_of_evidence_plus_evidential_terms(kl_weight):
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5, 5) * 2
    mask = torch.randint(0, 3, (2, 5, 5))
    z, y = logits.numpy().astype(np.float64), mask.numpy()
    evidence = np.log1p(np.exp(z))
    dice = _numpy_log_dice(softmax(evidence, axis=1), y, 3)  # softmax of the evidence (authors' code)
    alpha = evidence + 1
    strength = alpha.sum(axis=1)
    alpha_true = np.take_along_axis(alpha, y[:, None], axis=1)[:, 0]
    cross_entropy = (digamma(strength) - digamma(alpha_true)).mean()
    # KL(Dir(alpha~) || Dir(1)) with the true class's evidence removed, from scipy's lgamma/digamma.
    from scipy.special import gammaln
    onehot = np.eye(3)[y].transpose(0, 3, 1, 2)
    at = onehot + (1 - onehot) * alpha
    st = at.sum(axis=1)
    kl = gammaln(st) - gammaln(3) - gammaln(at).sum(axis=1) + ((at - 1) * (digamma(at) - digamma(st)[:, None])).sum(axis=1)
    expected = dice + cross_entropy + kl_weight * kl.mean()
    assert float(mutual_loss(logits, mask, kl_weight, evidential=True)) == pytest.approx(expected, rel=1e-5)


def _outputs(keys, b=2, k=2, c=3, size=8):
    out = {}
    if "cls" in keys:
        out["class_logits"] = torch.randn(b, k, requires_grad=True)
    if "seg" in keys:
        out["seg_logits"] = torch.randn(b, c, size, size, requires_grad=True)
        out["side_logits"] = [torch.randn(b, c, size // 2, size // 2, requires_grad=True)]
    if "mut" in keys:
        out["mutual_logits"] = torch.randn(b, c, size, size, requires_grad=True)
    return out


@pytest.mark.parametrize("evidential", [True, False])
def test_total_is_the_weighted_sum_of_parts(evidential):
    weights = LossParams(cls_weight=0.5, seg_weight=0.4, mut_weight=0.1, kl_annealing_epochs=4)
    out = _outputs({"cls", "seg", "mut"})
    mask, label = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 2, (2,))
    total, parts = uml_loss(out, mask, label, weights, epoch=2, evidential=evidential)
    assert set(parts) == {"cls", "seg", "mut"}
    assert float(total) == pytest.approx(0.5 * float(parts["cls"]) + 0.4 * float(parts["seg"]) + 0.1 * float(parts["mut"]), rel=1e-6)
    total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [out["class_logits"], out["seg_logits"], out["mutual_logits"]])


def test_kl_weight_follows_the_epoch():
    weights = LossParams(kl_annealing_epochs=4)
    out = _outputs({"cls"})
    label = torch.randint(0, 2, (2,))
    at_start = float(uml_loss(out, None, label, weights, epoch=0, evidential=True)[0])
    later = float(uml_loss(out, None, label, weights, epoch=4, evidential=True)[0])
    assert later > at_start  # the KL term only adds once lambda_t > 0


def test_single_task_losses():
    weights = LossParams()
    cls_only = uml_loss(_outputs({"cls"}), None, torch.tensor([0, 1]), weights, 1, True)[1]
    assert set(cls_only) == {"cls"}
    seg_only = uml_loss(_outputs({"seg"}), torch.randint(0, 3, (2, 8, 8)), None, weights, 1, True)[1]
    # No mutual decoder, no L_mut: a U-Net with deep supervision.
    assert set(seg_only) == {"seg"}
