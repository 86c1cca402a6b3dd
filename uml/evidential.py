"""Evidential (subjective-logic) outputs: evidence -> Dirichlet -> belief, probability, uncertainty.

For K classes, logits ``z`` give evidence ``e = softplus(z) >= 0``; ``alpha = e + 1`` parametrises
a Dirichlet with strength ``S = sum_k alpha_k``. The expected class probability is
``alpha / S`` and the uncertainty mass is ``u = K / S`` (1 with no evidence, towards 0 as evidence
grows). The same holds per pixel for segmentation, with the class axis at ``dim``.

Everything that involves lgamma/digamma runs in float32 with autocast disabled: those functions
lose too much precision (or are unsupported) in bf16/fp16.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


@contextmanager
def _full_precision(tensor: torch.Tensor):
    with torch.autocast(device_type=tensor.device.type, enabled=False):
        yield


def evidence_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Non-negative evidence; softplus keeps gradients alive for negative logits (unlike ReLU)."""
    return F.softplus(logits)


def dirichlet(evidence: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evidence -> ``(alpha, expected probability, uncertainty)``.

    ``uncertainty = K / S`` keeps the class dimension with size 1, so it broadcasts against
    ``prob`` and an image's uncertainty map has shape (B, 1, H, W).
    """
    num_classes = evidence.shape[dim]
    alpha = evidence + 1.0
    strength = alpha.sum(dim=dim, keepdim=True)
    return alpha, alpha / strength, num_classes / strength


def belief(evidence: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Belief masses ``b_k = e_k / S``; together with the uncertainty they sum to one."""
    return evidence / (evidence + 1.0).sum(dim=dim, keepdim=True)


def kl_to_uniform(alpha: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``KL(Dir(alpha) || Dir(1, ..., 1))`` in closed form, reduced over ``dim``.

    ``lgamma(S) - lgamma(K) - sum_k lgamma(alpha_k) + sum_k (alpha_k - 1)(digamma(alpha_k) - digamma(S))``;
    exactly 0 when every alpha is 1.
    """
    with _full_precision(alpha):
        alpha = alpha.float()
        num_classes = alpha.shape[dim]
        strength = alpha.sum(dim=dim, keepdim=True)
        kl = (
            torch.lgamma(strength).squeeze(dim)
            - math.lgamma(num_classes)
            - torch.lgamma(alpha).sum(dim=dim)
            + ((alpha - 1.0) * (torch.digamma(alpha) - torch.digamma(strength))).sum(dim=dim)
        )
        # Rounding can leave a tiny negative value where the true KL is 0.
        return kl.clamp_min(0.0)


def one_hot(target: torch.Tensor, num_classes: int, dim: int = 1) -> torch.Tensor:
    """Integer labels (B, ...) -> float one-hot with the class axis at ``dim``.

    Reads no value back to the host: checking the range here (or ``F.one_hot``, which does so
    on the CPU) would block on the device eight times per training step (min and max in each of
    the loss's four calls). The data set checks labels and mask values when it loads them
    (:class:`uml.data.dataset.SegClsDataset`); an index outside ``[0, num_classes)`` that gets
    here anyway still fails in ``scatter_``'s own bounds check (an error on the CPU, a device-side
    assert on a GPU), never silently.
    """
    target = target.long()
    encoded = torch.zeros(*target.shape, num_classes, dtype=torch.float32, device=target.device)
    return encoded.scatter_(-1, target.unsqueeze(-1), 1.0).movedim(-1, dim)


def evidential_cross_entropy(alpha: torch.Tensor, target_one_hot: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Expected cross-entropy under the Dirichlet: ``sum_k y_k (digamma(S) - digamma(alpha_k))``."""
    with _full_precision(alpha):
        alpha = alpha.float()
        strength = alpha.sum(dim=dim, keepdim=True)
        return (target_one_hot * (torch.digamma(strength) - torch.digamma(alpha))).sum(dim=dim)


def evidential_terms(evidence: torch.Tensor, target: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (per-pixel) evidential cross-entropy and KL regulariser, unreduced.

    The KL uses ``alpha_tilde = y + (1 - y) * alpha``: the evidence for the true class is removed,
    so only misleading evidence is pushed towards the uniform Dirichlet.
    """
    with _full_precision(evidence):
        evidence = evidence.float()
        y = one_hot(target, evidence.shape[dim], dim=dim)
        alpha = evidence + 1.0
        cross_entropy = evidential_cross_entropy(alpha, y, dim=dim)
        alpha_tilde = y + (1.0 - y) * alpha
        return cross_entropy, kl_to_uniform(alpha_tilde, dim=dim)


def normalized_entropy(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy of a categorical distribution divided by log K, in [0, 1], keeping ``dim``.

    The uncertainty that the softmax ablation (``model.uncertainty: false``) reports in place of
    ``K / S``, which a softmax head does not have.
    """
    num_classes = prob.shape[dim]
    entropy = -(prob * torch.log(prob.clamp_min(1e-12))).sum(dim=dim, keepdim=True)
    return entropy / math.log(num_classes)
