import math

import numpy as np
import pytest
import torch
from scipy import stats

from uml.evidential import belief, dirichlet, evidential_terms, kl_to_uniform, normalized_entropy, one_hot
from uml.losses import evidential_loss


def test_dirichlet_identities():
    evidence = torch.rand(5, 3, 4, 4) * 10
    alpha, prob, unc = dirichlet(evidence, dim=1)
    assert torch.allclose(alpha, evidence + 1)
    assert torch.allclose(prob.sum(1), torch.ones(5, 4, 4))
    assert unc.shape == (5, 1, 4, 4)
    assert bool((unc > 0).all()) and bool((unc <= 1).all())
    # Subjective logic: belief masses and the uncertainty mass sum to one.
    assert torch.allclose(belief(evidence).sum(1, keepdim=True) + unc, torch.ones_like(unc))


def test_no_evidence_means_full_uncertainty_and_uniform_probability():
    _, prob, unc = dirichlet(torch.zeros(2, 4))
    assert torch.allclose(unc, torch.ones(2, 1))
    assert torch.allclose(prob, torch.full((2, 4), 0.25))


def test_uncertainty_falls_as_evidence_grows():
    uncs = [float(dirichlet(torch.tensor([[e, 0.0]]))[2]) for e in (0.0, 1.0, 10.0, 100.0)]
    assert uncs == sorted(uncs, reverse=True) and uncs[0] == 1.0 and uncs[-1] < 0.03


def test_kl_is_zero_at_uniform_and_positive_elsewhere():
    assert float(kl_to_uniform(torch.ones(1, 3))) == pytest.approx(0.0, abs=1e-6)
    for alpha in ([2.0, 1.0, 1.0], [0.5, 0.5, 0.5], [1.0, 7.0, 3.0]):
        assert float(kl_to_uniform(torch.tensor([alpha]))) > 1e-3


@pytest.mark.parametrize("alpha", [[2.0, 1.0], [3.0, 1.5, 1.0], [1.2, 4.0, 2.5, 1.0]])
def test_kl_matches_monte_carlo_reference(alpha):
    """Independent check: E_{x~Dir(alpha)}[log p_alpha(x) - log p_1(x)] by sampling with scipy."""
    rng = np.random.default_rng(0)
    samples = rng.dirichlet(alpha, size=200_000)
    samples = np.clip(samples, 1e-12, None)
    samples /= samples.sum(1, keepdims=True)
    log_ratio = stats.dirichlet.logpdf(samples.T, alpha) - stats.dirichlet.logpdf(samples.T, np.ones(len(alpha)))
    reference = log_ratio.mean()
    stderr = log_ratio.std() / math.sqrt(len(log_ratio))
    got = float(kl_to_uniform(torch.tensor([alpha], dtype=torch.float64)))
    assert got == pytest.approx(reference, abs=5 * stderr + 1e-3)


def test_evidential_cross_entropy_hand_computed():
    # alpha = [3, 1], S = 4. True class 0: digamma(4) - digamma(3) = 1/3, and alpha_tilde = [1, 1]
    # so the KL term vanishes.
    evidence = torch.tensor([[2.0, 0.0]])
    assert float(evidential_loss(evidence, torch.tensor([0]), kl_weight=1.0)) == pytest.approx(1 / 3, abs=1e-5)
    # True class 1: digamma(4) - digamma(1) = 1 + 1/2 + 1/3; alpha_tilde = [3, 1] gives
    # KL = lgamma(4) - lgamma(2) - lgamma(3) - lgamma(1) + 2 (digamma(3) - digamma(4)) = log 3 - 2/3.
    ce, kl = evidential_terms(evidence, torch.tensor([1]))
    assert float(ce) == pytest.approx(11 / 6, abs=1e-5)
    assert float(kl) == pytest.approx(math.log(3) - 2 / 3, abs=1e-5)
    assert float(evidential_loss(evidence, torch.tensor([1]), kl_weight=0.5)) == pytest.approx(11 / 6 + 0.5 * (math.log(3) - 2 / 3), abs=1e-5)


def test_loss_falls_as_true_class_evidence_grows():
    losses = [float(evidential_loss(torch.tensor([[0.0, e, 0.0]]), torch.tensor([1]), kl_weight=1.0)) for e in (0, 1, 5, 50, 500)]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_loss_is_a_mean_over_samples_and_pixels():
    evidence = torch.rand(2, 3, 5, 5) * 4
    target = torch.randint(0, 3, (2, 5, 5))
    ce, kl = evidential_terms(evidence, target)
    assert ce.shape == kl.shape == (2, 5, 5)
    assert float(evidential_loss(evidence, target, 0.3)) == pytest.approx(float((ce + 0.3 * kl).mean()), rel=1e-6)


@pytest.mark.parametrize("value", [0.0, 1e6])
def test_extreme_evidence_is_finite_with_finite_gradients(value):
    evidence = torch.full((4, 3, 2, 2), value, requires_grad=True)
    target = torch.randint(0, 3, (4, 2, 2))
    loss = evidential_loss(evidence, target, kl_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(evidence.grad).all()
    _, prob, unc = dirichlet(evidence.detach())
    assert torch.isfinite(prob).all() and torch.isfinite(unc).all()


def test_safe_under_bf16_autocast():
    logits = torch.randn(4, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (4, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evidence = torch.nn.functional.softplus(logits.to(torch.bfloat16))
        loss = evidential_loss(evidence, target, kl_weight=1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    reference = evidential_loss(torch.nn.functional.softplus(logits.detach()), target, kl_weight=1.0)
    assert torch.isfinite(logits.grad).all()
    assert float(loss) == pytest.approx(float(reference), rel=2e-2)


def test_target_out_of_range_still_fails_without_a_range_check():
    # one_hot no longer reads the range back (a host sync); scatter's bounds check still refuses
    # an index outside [0, K). The clear message is the data set's (tests/data/test_dataset.py).
    for bad in (3, -1):
        with pytest.raises(RuntimeError, match="out of bounds"):
            evidential_loss(torch.rand(1, 3), torch.tensor([bad]), 1.0)


def test_one_hot_matches_torch_and_puts_classes_at_dim():
    target = torch.tensor([[[0, 2], [1, 0]]], dtype=torch.uint8)  # (1, 2, 2), uint8 as masks arrive
    encoded = one_hot(target, 3)
    assert encoded.dtype == torch.float32 and encoded.shape == (1, 3, 2, 2)
    assert torch.equal(encoded, torch.nn.functional.one_hot(target.long(), 3).movedim(-1, 1).float())
    assert encoded[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]  # pixel (0, 1) is class 2
    assert torch.equal(one_hot(torch.tensor([2, 0]), 3, dim=-1), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


def test_normalized_entropy_bounds():
    assert float(normalized_entropy(torch.full((1, 4), 0.25))) == pytest.approx(1.0)
    assert float(normalized_entropy(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)
