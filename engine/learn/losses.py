"""Masked segmentation losses and validation metrics in plain torch.

Training labels come from curated automatic segmentations (see :mod:`engine.curate`): a
ground truth (0 = background, 1 = foreground, optionally ``ignore_index`` = "don't know")
and an optional cost map (float, 0 = ignore, > 0 = train). Masked voxels — target equal to
``ignore_index`` or weight 0 — are *truly* masked:

* they contribute nothing to the loss, whatever the logits or target values there (even
  ``inf``/``nan`` logits), and the gradient of the loss w.r.t. their logits is exactly 0;
* they are counted in no denominator: the cross-entropy is a mean over valid voxels only,
  the soft Dice sums run over valid voxels only.

Shapes: logits ``(N, C, *spatial)`` with spatial ``(Y, X)`` or ``(Z, Y, X)``; binary targets
``(N, 1, *spatial)`` (or ``(N, *spatial)``), class targets ``(N, *spatial)``; weights of the
target's spatial layout. Reductions run over the whole batch (all samples and voxels
together), so that patches with few or no foreground voxels do not make the Dice unstable.

A batch with no valid voxel gives a loss of exactly 0 (finite), still attached to the
graph, with an all-zero gradient: such a batch trains nothing but does not break training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError, OptionError

__all__ = ["auto_class_weights", "class_counts", "dice_iou", "masked_bce_dice",
           "masked_ce_dice", "valid_mask"]


def _as_like(target: torch.Tensor, logits: torch.Tensor, what: str) -> torch.Tensor:
    """``target`` reshaped to ``logits``' shape for a single-channel model."""
    if target.shape == logits.shape:
        return target
    if logits.ndim >= 3 and logits.shape[1] == 1 and target.shape == logits.shape[:1] + \
            logits.shape[2:]:
        return target.unsqueeze(1)
    raise OptionError(
        f"{what} of shape {tuple(target.shape)} does not match logits of shape "
        f"{tuple(logits.shape)}"
    )


def valid_mask(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int | None
) -> torch.Tensor:
    """Boolean mask of the voxels that count: ``target != ignore_index`` and ``weight > 0``
    (``weight`` must have ``target``'s shape; ``None``: no cost map)."""
    valid = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        valid &= target != ignore_index
    if weight is not None:
        if weight.shape != target.shape:
            raise OptionError(
                f"weight of shape {tuple(weight.shape)} does not match target of shape "
                f"{tuple(target.shape)}"
            )
        valid &= weight > 0
    return valid


def class_counts(target: torch.Tensor, valid: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Number of valid voxels of each class: int64 ``(n_classes,)``.

    ``target`` holds class indices in ``[0, n_classes)`` wherever ``valid`` is true (any
    value elsewhere); the frequencies behind ``pos_weight="auto"`` and
    ``class_weights="auto"``.
    """
    return torch.bincount(target[valid].long().flatten(), minlength=n_classes)[:n_classes]


def auto_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse class frequencies, normalised to mean 1 over the classes present: float64.

    ``w_c = (1 / n_c) / mean_k(1 / n_k)`` over the classes with ``n_k > 0``; an absent class
    gets 1 (it has no voxel to weight). All 1 when no class is present. For two classes
    ``w_1 / w_0 = n_0 / n_1``, the ``pos_weight="auto"`` ratio.
    """
    n = counts.to(torch.float64)
    present = n > 0
    w = torch.ones_like(n)
    if bool(present.any()):
        inv = 1.0 / n[present]
        w[present] = inv / inv.mean()
    return w


def _class_weights(spec: None | str | Sequence[float], counts: torch.Tensor | None,
                   n_classes: int, like: torch.Tensor) -> torch.Tensor | None:
    """The per-class weights of ``class_weights=spec`` as a tensor like ``like``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise OptionError(f"class_weights must be None, 'auto' or one positive number "
                              f"per class, not {spec!r}")
        assert counts is not None
        return auto_class_weights(counts).to(dtype=like.dtype, device=like.device)
    try:
        values = [float(v) for v in spec]
    except (TypeError, ValueError):
        raise OptionError(f"class_weights must be None, 'auto' or one positive number per "
                          f"class, not {spec!r}") from None
    if len(values) != n_classes or not all(math.isfinite(v) and v > 0 for v in values):
        raise OptionError(f"class_weights needs {n_classes} positive numbers (one per class), "
                          f"got {values}")
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def masked_bce_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = 2,
    pos_weight: None | str | float = None,
    dice_weight: float = 1.0,
    eps: float = 1e-6,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Binary cross-entropy + soft Dice over the valid voxels of a binary segmentation.

    Parameters
    ----------
    logits : torch.Tensor
        Float ``(N, 1, *spatial)``, before the sigmoid.
    target : torch.Tensor
        ``(N, 1, *spatial)`` or ``(N, *spatial)``, any numeric dtype, values 0, 1 or
        ``ignore_index``.
    weight : torch.Tensor, optional
        Cost map, float, target's shape. 0 masks a voxel; a value ``w > 0`` multiplies
        that voxel's BCE term by ``w`` (the mean still divides by the number of valid
        voxels, so weights are absolute: a cost of 2 counts a voxel twice). The Dice term
        is not weighted: it is the plain soft Dice of the valid voxels.
    ignore_index : int or None
        Target value meaning "unknown" (default 2); ``None``: none.
    pos_weight : None, "auto" or float
        Factor on the positive (target 1) BCE term, as ``torch``'s ``pos_weight``.
        ``"auto"``: ``#negative / #positive`` over the batch's valid voxels (MISIC's
        class-balanced weighted loss), 1.0 when either count is 0.
    dice_weight : float
        Factor on the Dice loss (0: BCE only).
    eps : float
        Smoothing of the Dice ratio: ``1 - (2 Σ p t + eps) / (Σ p + Σ t + eps)``, with
        ``p = sigmoid(logits)`` and the sums over valid voxels.
    reduce : callable, optional
        Applied to every batch-wide sum (valid-voxel count, class counts, loss and Dice
        sums) before they are combined: with a differentiable sum over data-parallel
        ranks (:func:`engine.learn.ddp.global_sum`) each rank computes the loss of the
        global batch. ``None``: the batch is the whole batch.

    Returns
    -------
    torch.Tensor
        Scalar: ``Σ_valid w · bce / n_valid + dice_weight · (1 - dice)``; exactly 0 when no
        voxel is valid.
    """
    if logits.ndim < 3 or logits.shape[1] != 1:
        raise OptionError(
            f"masked_bce_dice needs logits of shape (N, 1, ...), not {tuple(logits.shape)}"
        )
    target = _as_like(target, logits, "target")
    if weight is not None:
        weight = _as_like(weight, logits, "weight")
    valid = valid_mask(target, weight, ignore_index)
    t = torch.where(valid, target, torch.zeros_like(target)).to(logits.dtype)
    if bool(((t != 0) & (t != 1)).any()):
        bad = torch.unique(target[valid & (t != 0) & (t != 1)]).tolist()[:5]
        raise InputError(
            f"binary target values must be 0, 1 or ignore_index={ignore_index}; found {bad}"
        )
    # torch.where passes no gradient to the unselected branch: masked logits get exactly 0
    x = torch.where(valid, logits, torch.zeros_like(logits))
    total = reduce or (lambda v: v)
    n_valid = int(total(valid.sum()))
    if isinstance(pos_weight, str):
        if pos_weight != "auto":
            raise OptionError(f"pos_weight must be None, 'auto' or a number, not {pos_weight!r}")
        n_neg, n_pos = total(class_counts(t, valid, 2)).tolist()
        pw = n_neg / n_pos if n_pos and n_neg else 1.0
    else:
        pw = 1.0 if pos_weight is None else float(pos_weight)
    bce = F.binary_cross_entropy_with_logits(
        x, t, reduction="none", pos_weight=torch.tensor(pw, dtype=x.dtype, device=x.device)
    )
    vmask = valid.to(x.dtype)
    w = vmask if weight is None else torch.where(valid, weight.to(x.dtype), 0.0)
    loss = total((w * bce).sum()) / max(n_valid, 1)
    if dice_weight:
        p = torch.sigmoid(x) * vmask
        dice = (2 * total((p * t).sum()) + eps) / (total(p.sum()) + total(t.sum()) + eps)
        loss = loss + dice_weight * (1 - dice)
    return loss


def masked_ce_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    dice_weight: float = 1.0,
    eps: float = 1e-6,
    class_weights: None | str | Sequence[float] = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy + multi-class soft Dice over the valid voxels.

    Parameters
    ----------
    logits : torch.Tensor
        Float ``(N, C, *spatial)``, before the softmax.
    target : torch.Tensor
        Integer class map ``(N, *spatial)`` with values in ``[0, C)`` or ``ignore_index``.
    weight : torch.Tensor, optional
        Cost map, float ``(N, *spatial)``: 0 masks a voxel, ``w > 0`` scales its
        cross-entropy term (mean over valid voxels, as :func:`masked_bce_dice`).
    ignore_index : int or None
        Class value meaning "unknown" (default -100, as ``torch``'s cross-entropy).
    dice_weight : float
        Factor on the Dice loss (0: cross-entropy only).
    eps : float
        Smoothing of each class's Dice ratio ``(2 Σ p_c t_c + eps) / (Σ p_c + Σ t_c + eps)``
        (sums over valid voxels); the Dice loss is ``1 -`` the mean over the C classes
        (a class absent from target and prediction scores 1).
    class_weights : None, "auto" or sequence of float
        Per-class factor ``cw[c]`` on the cross-entropy term of each voxel of target class
        ``c`` (as ``weight=`` of ``F.cross_entropy``), multiplied with the cost map.
        ``"auto"``: inverse class frequencies over the batch's valid voxels, normalised to
        mean 1 over the classes present (:func:`auto_class_weights`; the multi-class
        ``pos_weight="auto"``); a sequence: one positive number per class. The Dice term
        is not weighted. ``None``: all 1.
    reduce : callable, optional
        Applied to every batch-wide sum (valid-voxel count, class counts, loss and Dice
        sums) before they are combined: with a differentiable sum over data-parallel
        ranks (:func:`engine.learn.ddp.global_sum`) each rank computes the loss of the
        global batch. ``None``: the batch is the whole batch.

    Returns
    -------
    torch.Tensor
        Scalar: ``Σ_valid w · cw[t] · ce / n_valid + dice_weight · (1 - mean_c dice_c)``;
        exactly 0 when no voxel is valid. The denominator is the number of valid voxels,
        not torch's ``Σ cw[t]``: class weights, like the cost map, are absolute, so without
        cost map, ignored voxels and Dice the loss equals
        ``F.cross_entropy(logits, target, weight=cw, reduction="sum") / n_valid``. Without
        weight, class weights and with ``dice_weight=0`` it equals
        ``F.cross_entropy(logits, target, ignore_index=ignore_index)``.
    """
    if logits.ndim < 3:
        raise OptionError(
            f"masked_ce_dice needs logits of shape (N, C, ...), not {tuple(logits.shape)}"
        )
    n_classes = logits.shape[1]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise OptionError(
            f"target of shape {tuple(target.shape)} does not match logits of shape "
            f"{tuple(logits.shape)}: expected {tuple(logits.shape[:1] + logits.shape[2:])}"
        )
    if target.is_floating_point():
        raise OptionError(f"target must be an integer class map, not {target.dtype}")
    target = target.long()
    valid = valid_mask(target, weight, ignore_index)
    t = torch.where(valid, target, torch.zeros_like(target))
    if bool(((t < 0) | (t >= n_classes)).any()):
        bad = torch.unique(t[(t < 0) | (t >= n_classes)]).tolist()[:5]
        raise InputError(
            f"class target values must be in [0, {n_classes}) or ignore_index="
            f"{ignore_index}; found {bad}"
        )
    vc = valid.unsqueeze(1)
    x = torch.where(vc, logits, torch.zeros_like(logits))
    total = reduce or (lambda v: v)
    n_valid = int(total(valid.sum()))
    counts = total(class_counts(t, valid, n_classes)) if isinstance(class_weights, str) \
        else None
    cw = _class_weights(class_weights, counts, n_classes, x)
    ce = F.cross_entropy(x, t, weight=cw, reduction="none")  # cw[t] * ce per voxel
    vmask = valid.to(x.dtype)
    w = vmask if weight is None else torch.where(valid, weight.to(x.dtype), 0.0)
    loss = total((w * ce).sum()) / max(n_valid, 1)
    if dice_weight:
        p = torch.softmax(x, dim=1) * vmask.unsqueeze(1)
        onehot = F.one_hot(t, n_classes).movedim(-1, 1).to(x.dtype) * vmask.unsqueeze(1)
        dims = [0, *range(2, x.ndim)]
        dice = (2 * total((p * onehot).sum(dims)) + eps) / (
            total(p.sum(dims)) + total(onehot.sum(dims)) + eps)
        loss = loss + dice_weight * (1 - dice.mean())
    return loss


def dice_iou(
    pred_mask: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    ignore_index: int | None = 2,
    weight: torch.Tensor | np.ndarray | None = None,
) -> tuple[float, float]:
    """Dice and IoU of a binary prediction against a binary target, ignored voxels excluded.

    Parameters
    ----------
    pred_mask : torch.Tensor or numpy.ndarray
        Binary prediction (bool, or numbers: non-zero = foreground), any shape; threshold
        probabilities before calling.
    target : torch.Tensor or numpy.ndarray
        Same shape, values 0, 1 or ``ignore_index`` (non-zero valid values = foreground).
    ignore_index : int or None
        Target value excluded from the counts (default 2).
    weight : optional
        Cost map of the same shape; voxels with weight 0 are excluded (the weights do not
        otherwise scale the counts).

    Returns
    -------
    (float, float)
        ``dice = 2 TP / (2 TP + FP + FN)`` and ``iou = TP / (TP + FP + FN)`` over valid
        voxels; both 1.0 when neither prediction nor target has a valid foreground voxel.
    """
    pred = torch.as_tensor(pred_mask)
    tgt = torch.as_tensor(target)
    if pred.shape != tgt.shape:
        raise OptionError(
            f"prediction of shape {tuple(pred.shape)} does not match target of shape "
            f"{tuple(tgt.shape)}"
        )
    w = None if weight is None else torch.as_tensor(weight)
    valid = valid_mask(tgt, w, ignore_index)
    p = (pred != 0) & valid
    t = (tgt != 0) & valid
    tp = int((p & t).sum())
    fp = int((p & ~t).sum())
    fn = int((~p & t).sum())
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
