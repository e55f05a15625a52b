"""The cutter objective: cellcutter's self-supervised loss for marker-centred crops.

For crops ``i = 1..N`` (one per marker) lying in a common area, the network's probabilities
``y_i = sigmoid(logit_i)`` (shape ``(c, c)``, crop ``i`` placed at ``offset_i`` in the area)
are scored as

.. math::

    L = \\frac{1}{N} \\sum_i \\sum_{p \\in \\mathrm{crop}_i} \\Big[ -y_i(p)
        + \\lambda\\, y_i(p) \\sum_{j \\ne i} -\\log\\big(1 - y_j(p)\\big)
        + \\mu\\, y_i(p)\\, [p \\notin F] \\Big]

* **area reward** ``-Σ y_i``: every marker's mask wants to grow;
* **overlap penalty** (weight ``λ``, ``--overlap-weight``): a pixel claimed by marker ``i``
  costs the evidence that the *other* markers claim it too, ``-log(1 - y_j)`` (0 when
  ``y_j = 0``, growing without bound as ``y_j → 1``); this is what "cuts" touching cells
  apart;
* **outside penalty** (weight ``μ``, ``--outside-weight``): pixels outside the foreground
  mask ``F`` (the graph cut), and outside the image, cost ``μ`` each.

How it relates to the published loss (``cellcutter/loss.py``, ``cutter_loss``): there,
``log(1 - y)`` is clipped at ``ε = 1e-7`` (Keras' epsilon), summed over all crops into an
area image to which the mask term ``log(ε) · [p ∉ F]`` is added, and the loss is
``(-Σ y + λ Σ y_i (S - log(1 - y_i)))/N`` with ``S`` that sum, i.e. the same three terms with
a single weight ``λ`` (default 1) multiplying both penalties and an outside weight of
``-log ε ≈ 16.12``. Here the two penalties have separate weights; the defaults
(``λ = 1``, ``μ = -log 1e-7``) give exactly the published value. The published training
samples random square areas and takes the crops of every marker inside; here a sample is
one marker's crop plus the crops that overlap it (see :mod:`engine.cutter.train`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-7
#: cellcutter's mask value: log(ε) outside the foreground, i.e. a cost of -log ε per pixel
OUTSIDE_WEIGHT = -math.log(EPS)


def cutter_loss(logits: torch.Tensor, offsets: Sequence[Sequence[int]],
                area_shape: Sequence[int], outside: torch.Tensor,
                overlap_weight: float = 1.0, outside_weight: float = OUTSIDE_WEIGHT
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The cutter loss of ``N`` crops in one area.

    Parameters
    ----------
    logits : torch.Tensor, shape (N, c, c) or (N, 1, c, c)
        The network's logits for each marker's crop.
    offsets : sequence of (int, int)
        Top-left pixel of each crop in the area; every crop lies inside the area.
    area_shape : (int, int)
        Shape of the area.
    outside : torch.Tensor, shape ``area_shape``
        1 (or True) where a pixel is outside the foreground mask (or the image), else 0.
    overlap_weight, outside_weight : float
        ``λ`` and ``μ`` of the module's formula.

    Returns
    -------
    loss : torch.Tensor
        Scalar, differentiable.
    terms : dict
        Per-crop means of the three sums (``area`` = Σ y, ``overlap`` = Σ y_i Σ_j −log(1−y_j),
        ``outside`` = Σ y [outside]) as floats, unweighted.
    """
    if logits.ndim == 4:
        logits = logits[:, 0]
    n, ch, cw = logits.shape
    h, w = int(area_shape[0]), int(area_shape[1])
    y = torch.sigmoid(logits)
    # -log(1 - y), clipped as cellcutter clips it (1 - y ≥ ε)
    nl = -torch.log(torch.clamp(1.0 - y, min=EPS, max=1.0))
    placed = [F.pad(nl[i], (int(ox), w - int(ox) - cw, int(oy), h - int(oy) - ch))
              for i, (oy, ox) in enumerate(offsets)]
    total = torch.stack(placed).sum(0)
    others = torch.stack([total[oy:oy + ch, ox:ox + cw] for oy, ox in offsets]) - nl
    out = torch.stack([outside[oy:oy + ch, ox:ox + cw] for oy, ox in offsets]).to(y.dtype)
    area = y.sum()
    overlap = (y * others).sum()
    outside_sum = (y * out).sum()
    loss = (-area + overlap_weight * overlap + outside_weight * outside_sum) / n
    terms = {"area": float(area.detach()) / n, "overlap": float(overlap.detach()) / n,
             "outside": float(outside_sum.detach()) / n}
    return loss, terms
