"""The UML training objective (docs/explanation/method.md; as the authors' 2023 code computes it).

``total = cls_weight * L_cls + seg_weight * L_seg + mut_weight * L_mut`` with

- ``L_cls``: evidential cross-entropy + annealed KL on the image-level evidence;
- ``L_mut``: soft log-Dice on the softmax of the mutual evidence + mean pixel evidential
  cross-entropy + annealed mean KL on the Dirichlet ``alpha = e_m + 1``;
- ``L_seg``: soft log-Dice on the softmax of the navigator's logits, averaged over ``S_0`` and the
  three side outputs, each upsampled to full size.

``lambda_t = min(1, epoch / kl_annealing_epochs)`` weights the KL terms, epoch counted from 0.
With ``model.uncertainty: false`` the same structure uses softmax probabilities, plain
cross-entropy and no KL (the joint-learning ablation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from uml.config import LossParams
from uml.evidential import evidence_from_logits, evidential_terms, one_hot
from uml.models.blocks import resize

DICE_EPS = 1e-5


def kl_annealing(epoch: int, annealing_epochs: int) -> float:
    """``lambda_t = min(1, epoch / annealing_epochs)``, epoch counted from 0."""
    if annealing_epochs < 1:
        raise ValueError(f"kl_annealing_epochs must be >= 1, got {annealing_epochs}")
    return min(1.0, epoch / annealing_epochs)


def evidential_loss(evidence: torch.Tensor, target: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Mean over samples (and pixels) of the evidential cross-entropy plus ``kl_weight`` x KL.

    ``evidence`` (B, K, ...) non-negative; ``target`` (B, ...) int64 class indices.
    """
    if evidence.dim() != target.dim() + 1:
        raise ValueError(f"evidence (B, K, ...) needs one more dim than target (B, ...), got {tuple(evidence.shape)} and {tuple(target.shape)}")
    cross_entropy, kl = evidential_terms(evidence, target, dim=1)
    return (cross_entropy + kl_weight * kl).mean()


def soft_log_dice(prob: torch.Tensor, target_one_hot: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """Mean over classes (background included) of ``-log((2 sum p g + eps) / (sum p + sum g + eps))``.

    Sums run over the batch and all pixels, per class.
    """
    with torch.autocast(device_type=prob.device.type, enabled=False):
        prob, target_one_hot = prob.float(), target_one_hot.float()
        reduce_dims = [0, *range(2, prob.dim())]
        intersection = (prob * target_one_hot).sum(dim=reduce_dims)
        denominator = prob.sum(dim=reduce_dims) + target_one_hot.sum(dim=reduce_dims)
        return -torch.log((2.0 * intersection + eps) / (denominator + eps)).mean()


def mutual_loss(logits: torch.Tensor, mask: torch.Tensor, kl_weight: float, evidential: bool) -> torch.Tensor:
    """``L_mut``: soft log-Dice + mean pixel (evidential) cross-entropy (+ annealed mean KL).

    Evidential: the Dice term is on ``softmax(e_m)`` with ``e_m = softplus(logits)`` (the
    authors' code), the cross-entropy and KL on ``alpha = e_m + 1``. Ablation: softmax Dice + CE.
    """
    logits = resize(logits, mask.shape[-2:])
    target = one_hot(mask, logits.shape[1])
    if evidential:
        evidence = evidence_from_logits(logits)
        return soft_log_dice(torch.softmax(evidence, dim=1), target) + evidential_loss(evidence, mask, kl_weight)
    return soft_log_dice(torch.softmax(logits, dim=1), target) + F.cross_entropy(logits.float(), mask)


def segmentation_loss(outputs: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``L_seg``: soft log-Dice on the softmax of each navigator output (``S_0`` and the side
    outputs), each upsampled to full size, averaged over the outputs."""
    target = one_hot(mask, outputs[0].shape[1])
    terms = [soft_log_dice(torch.softmax(resize(o, mask.shape[-2:]), dim=1), target) for o in outputs]
    return torch.stack(terms).mean()


def classification_loss(logits: torch.Tensor, label: torch.Tensor, kl_weight: float, evidential: bool) -> torch.Tensor:
    """``L_cls``: evidential cross-entropy + annealed KL (or plain cross-entropy)."""
    if evidential:
        return evidential_loss(evidence_from_logits(logits), label, kl_weight)
    return F.cross_entropy(logits.float(), label)


def uml_loss(
    outputs: Mapping[str, torch.Tensor | list[torch.Tensor]],
    mask: torch.Tensor | None,
    label: torch.Tensor | None,
    weights: LossParams,
    epoch: int,
    evidential: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total for whatever heads the model has, and its detached parts (for logging:
    tensors, so that logging does not force a device sync every step).

    - joint model: ``cls_weight * L_cls + seg_weight * L_seg + mut_weight * L_mut``;
    - ``tasks: [cls]``: ``cls_weight * L_cls``;
    - ``tasks: [seg]``: ``seg_weight * L_seg`` (a U-Net with deep supervision: no mutual branch).
    """
    kl_weight = kl_annealing(epoch, weights.kl_annealing_epochs)
    parts: dict[str, torch.Tensor] = {}
    total = None

    def add(name: str, weight: float, value: torch.Tensor) -> None:
        nonlocal total
        parts[name] = value.detach()
        total = weight * value if total is None else total + weight * value

    if "class_logits" in outputs:
        add("cls", weights.cls_weight, classification_loss(outputs["class_logits"], label, kl_weight, evidential))
    if "seg_logits" in outputs:
        add("seg", weights.seg_weight, segmentation_loss([outputs["seg_logits"], *outputs["side_logits"]], mask))
    if "mutual_logits" in outputs:
        add("mut", weights.mut_weight, mutual_loss(outputs["mutual_logits"], mask, kl_weight, evidential))
    if total is None:
        raise ValueError("the model produced neither class nor segmentation logits")
    return total, parts
