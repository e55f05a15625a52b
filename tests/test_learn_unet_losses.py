"""U-Net models (shapes, divisibility, receptive field, arch round trip) and masked losses
and metrics (hand-computed values, ignore invariance, torch/numpy references)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from engine.errors import InputError, OptionError  # noqa: E402
from engine.learn.losses import dice_iou, masked_bce_dice, masked_ce_dice  # noqa: E402
from engine.learn.unet import UNet, receptive_field  # noqa: E402

F = torch.nn.functional


# ----------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(spatial_dims=2, in_channels=3, out_channels=2, features=(4, 8, 16)), (2, 3, 16, 24)),
        (dict(spatial_dims=2, in_channels=1, out_channels=1, features=(4, 8), norm="batch",
              up_mode="upsample"), (2, 1, 6, 10)),
        (dict(spatial_dims=3, in_channels=1, out_channels=3, features=(4, 8, 16), norm="group",
              num_groups=2), (1, 1, 8, 12, 16)),
        (dict(spatial_dims=3, in_channels=2, out_channels=1, features=(4, 8, 16),
              anisotropic_levels=1), (1, 2, 2, 16, 12)),
        (dict(spatial_dims=3, in_channels=1, out_channels=1, features=(2, 4, 8),
              anisotropic_levels=2, norm=None, up_mode="upsample"), (1, 1, 3, 8, 8)),
    ],
)
def test_unet_output_shape(kwargs, shape):
    model = UNet(**kwargs)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], kwargs["out_channels"], *shape[2:])
    assert torch.isfinite(out).all()


def test_unet_divisor_and_anisotropic_layers():
    m = UNet(3, 1, 1, features=(4, 8, 16, 32), anisotropic_levels=2)
    assert m.divisor == (2, 8, 8)
    assert [p.kernel_size for p in m.pools] == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert m.encoders[0][0].kernel_size == (1, 3, 3)
    assert m.encoders[1][0].kernel_size == (1, 3, 3)
    assert m.encoders[2][0].kernel_size == (3, 3, 3)
    assert m.decoders[1][0].kernel_size == (1, 3, 3)
    assert m.ups[0].kernel_size == (1, 2, 2)
    assert UNet(2, 1, 1, features=(4, 8, 16, 32)).divisor == (8, 8)
    assert UNet(2, 1, 1, features=(4,)).divisor == (1, 1)


def test_unet_divisibility_error():
    m = UNet(3, 1, 1, features=(4, 8, 16, 32), anisotropic_levels=2)
    m.check_input_shape((4, 64, 32))
    with pytest.raises(OptionError) as err:
        m.check_input_shape((7, 33, 30))
    msg = str(err.value)
    assert "(7, 33, 30)" in msg and "(2, 8, 8)" in msg and "3 poolings" in msg
    assert "e.g. use (8, 32, 32)" in msg
    with pytest.raises(OptionError, match=r"e\.g\. use \(2, 8, 8\)"):
        m.check_input_shape((1, 3, 8))
    with pytest.raises(OptionError, match="must be divisible by"):
        m(torch.zeros(1, 1, 4, 64, 36))
    with pytest.raises(OptionError, match="3 spatial axes"):
        m.check_input_shape((64, 64))
    with pytest.raises(OptionError, match="does not fit"):
        m(torch.zeros(1, 2, 4, 64, 64))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(spatial_dims=4, in_channels=1, out_channels=1),
        dict(spatial_dims=2, in_channels=0, out_channels=1),
        dict(spatial_dims=2, in_channels=1, out_channels=1, norm="layer"),
        dict(spatial_dims=2, in_channels=1, out_channels=1, features=()),
        dict(spatial_dims=2, in_channels=1, out_channels=1, anisotropic_levels=1),
        dict(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 8), anisotropic_levels=2),
        dict(spatial_dims=2, in_channels=1, out_channels=1, up_mode="bilinear"),
    ],
)
def test_unet_invalid_options(kwargs):
    with pytest.raises(OptionError):
        UNet(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(spatial_dims=2, in_channels=3, out_channels=2, features=(4, 8, 16), norm="batch"),
        dict(spatial_dims=3, in_channels=1, out_channels=1, features=[4, 8, 16],
             anisotropic_levels=1, up_mode="upsample", norm="group", num_groups=4),
        dict(spatial_dims=3, in_channels=1, out_channels=1, norm=None),
    ],
)
def test_unet_arch_round_trip(kwargs):
    model = UNet(**kwargs)
    arch = json.loads(json.dumps(model.arch()))
    rebuilt = UNet(**arch)
    assert rebuilt.arch() == model.arch()
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    x = torch.randn(1, kwargs["in_channels"], *([8] * kwargs["spatial_dims"]))
    model.eval()
    rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def _linearised(model: UNet) -> UNet:
    """ReLU → identity and max-pool → average pool: the same connectivity, but every path
    carries gradient, so the gradient support is exactly the receptive field."""
    for name, mod in list(model.named_modules()):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.ReLU):
            setattr(parent, leaf, nn.Identity())
        elif isinstance(mod, nn.MaxPool2d | nn.MaxPool3d):
            cls = nn.AvgPool2d if isinstance(mod, nn.MaxPool2d) else nn.AvgPool3d
            setattr(parent, leaf, cls(mod.kernel_size, mod.stride))
    return model


def _support_extents(model: UNet, shape: tuple[int, ...], pos: tuple[int, ...]):
    x = torch.randn(1, model.in_channels, *shape, dtype=torch.float64, requires_grad=True)
    out = model(x)
    out[(0, 0, *pos)].backward()
    nz = np.nonzero(x.grad[0].abs().sum(0).numpy())
    if not nz[0].size:  # every path through a dead ReLU
        return None
    return [(int(ix.min()), int(ix.max())) for ix in nz]


@pytest.mark.parametrize(
    "kwargs, rf",
    [
        # closed form: 1 + 4 + 1 + 8 + 2 + 16 + 8 + 4 = 44
        (dict(spatial_dims=2, features=(4, 8, 16)), (44, 44)),
        # 1 + 4 + 1 + 8 + 4 = 18
        (dict(spatial_dims=2, features=(3, 4), up_mode="upsample"), (18, 18)),
        (dict(spatial_dims=3, features=(2, 3, 4), anisotropic_levels=1), None),
        (dict(spatial_dims=3, features=(2, 3, 4), anisotropic_levels=2), None),
    ],
)
def test_receptive_field_matches_gradient_support(kwargs, rf):
    torch.manual_seed(0)
    model = UNet(in_channels=2, out_channels=1, norm=None, **kwargs).double().eval()
    computed = receptive_field(model)
    if rf is not None:
        assert computed == rf
    div = model.divisor
    # large enough that the receptive field of the central voxels stays off the borders
    shape = tuple(q * math.ceil((2 * r + 2 * q) / q) for r, q in zip(computed, div, strict=True))
    centre = tuple(s // 2 for s in shape)
    lin = _linearised(model)
    reached = [0] * len(shape)
    # the dependency pattern repeats with the divisor: scan one period on every axis
    for k in range(max(div)):
        pos = tuple(c + k % q for c, q in zip(centre, div, strict=True))
        ext = _support_extents(lin, shape, pos)
        for a, (lo, hi) in enumerate(ext):
            assert hi - lo + 1 <= computed[a]
            assert lo <= pos[a] <= hi
            assert 0 < lo and hi < shape[a] - 1  # interior: not clipped by the borders
            reached[a] = max(reached[a], hi - lo + 1)
    assert tuple(reached) == computed
    # the real (ReLU, max-pool) model depends on a subset of that extent
    checked = 0
    for seed in range(1, 6):
        torch.manual_seed(seed)
        real = UNet(in_channels=2, out_channels=1, norm=None, **kwargs).double().eval()
        ext = _support_extents(real, shape, centre)
        if ext is None:
            continue
        checked += 1
        for a, (lo, hi) in enumerate(ext):
            assert hi - lo + 1 <= computed[a]
    assert checked


def test_receptive_field_anisotropic_values():
    # Z: levels 0 (kernel 1, in-plane pool) add nothing; the 3x3x3 levels 1 and 2 add
    # 4 + 1 (pool) + 8 (bottleneck at jump 2) + 4 = 18 along Z, in-plane as a 2D 3-level net
    m = UNet(3, 1, 1, features=(2, 3, 4), anisotropic_levels=1)
    assert receptive_field(m) == (1 + 4 + 1 + 8 + 4, 44, 44)
    m = UNet(3, 1, 1, features=(2, 3, 4), anisotropic_levels=2)
    assert receptive_field(m) == (5, 44, 44)


# ----------------------------------------------------------------------------- losses


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_bce_dice_hand_computed():
    logits = torch.tensor([[[2.0, -1.0, 0.5, 3.0]]], dtype=torch.float64)
    target = torch.tensor([[[1, 0, 2, 1]]])
    valid = [(2.0, 1), (-1.0, 0), (3.0, 1)]
    bce = [-math.log(_sig(v)) if t else -math.log(1 - _sig(v)) for v, t in valid]
    eps = 1e-6
    sp = sum(_sig(v) for v, _ in valid)
    spt = sum(_sig(v) for v, t in valid if t)
    dice = (2 * spt + eps) / (sp + 2 + eps)
    got = masked_bce_dice(logits, target, dice_weight=0.0)
    assert got.item() == pytest.approx(sum(bce) / 3, rel=1e-12)
    got = masked_bce_dice(logits, target)
    assert got.item() == pytest.approx(sum(bce) / 3 + 1 - dice, rel=1e-12)
    got = masked_bce_dice(logits, target[:, 0], dice_weight=0.5)  # (N, *spatial) target
    assert got.item() == pytest.approx(sum(bce) / 3 + 0.5 * (1 - dice), rel=1e-12)
    # float pos_weight doubles the positive terms
    bce_pw = [2 * b if t else b for b, (_, t) in zip(bce, valid, strict=True)]
    got = masked_bce_dice(logits, target, pos_weight=2.0, dice_weight=0.0)
    assert got.item() == pytest.approx(sum(bce_pw) / 3, rel=1e-12)
    # cost map: 0 masks voxel 3, 0.5 scales voxel 1; mean over the 2 valid voxels
    weight = torch.tensor([[[1.0, 0.5, 5.0, 0.0]]], dtype=torch.float64)
    got = masked_bce_dice(logits, target, weight=weight)
    dice_w = (2 * _sig(2.0) + eps) / (_sig(2.0) + _sig(-1.0) + 1 + eps)
    assert got.item() == pytest.approx((bce[0] + 0.5 * bce[1]) / 2 + 1 - dice_w, rel=1e-12)


def test_pos_weight_auto_formula():
    logits = torch.tensor([[[0.3, -1.2, 2.0, 0.7, -0.4, 1.0]]], dtype=torch.float64)
    target = torch.tensor([[[1, 0, 0, 1, 0, 2]]])  # valid: 2 positive, 3 negative
    terms = [(-1.5 * math.log(_sig(v)) if t else -math.log(1 - _sig(v)))
             for v, t in zip(logits[0, 0, :5].tolist(), target[0, 0, :5].tolist(), strict=True)]
    got = masked_bce_dice(logits, target, pos_weight="auto", dice_weight=0.0)
    assert got.item() == pytest.approx(sum(terms) / 5, rel=1e-12)
    torch.manual_seed(3)
    logits = torch.randn(2, 1, 5, 6)
    target = torch.randint(0, 3, (2, 1, 5, 6))
    weight = (torch.rand(2, 1, 5, 6) > 0.3).float()
    v = (target != 2) & (weight > 0)
    ratio = ((target == 0) & v).sum().item() / ((target == 1) & v).sum().item()
    a = masked_bce_dice(logits, target, weight, pos_weight="auto")
    b = masked_bce_dice(logits, target, weight, pos_weight=ratio)
    assert torch.allclose(a, b, rtol=1e-6)
    # no positives: falls back to 1.0
    zeros = torch.zeros(1, 1, 4, dtype=torch.long)
    assert torch.equal(masked_bce_dice(logits[:1, :, 0, :4], zeros, pos_weight="auto"),
                       masked_bce_dice(logits[:1, :, 0, :4], zeros))
    with pytest.raises(OptionError):
        masked_bce_dice(logits, target, pos_weight="balanced")


def _loss_and_grad(fn, logits, *args, **kwargs):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


def test_bce_dice_ignore_invariance():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 7, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 6, 7))
    weight = torch.rand(2, 1, 6, 7, dtype=torch.float64) + 0.5
    weight[torch.rand(2, 1, 6, 7) < 0.3] = 0.0
    valid = (target != 2) & (weight > 0)
    for pw in (None, "auto", 3.0):
        loss, grad = _loss_and_grad(masked_bce_dice, logits, target, weight, pos_weight=pw)
        assert torch.isfinite(loss) and loss > 0
        assert torch.all(grad[~valid] == 0) and torch.any(grad[valid] != 0)
        # change logits anywhere masked (huge, inf, nan) and targets under cost 0
        logits2 = logits.clone()
        junk = torch.tensor([1e6, -math.inf, math.nan, 7.0], dtype=torch.float64)
        logits2[~valid] = junk[torch.randint(0, 4, (int((~valid).sum()),))]
        target2 = target.clone()
        under_cost0 = (weight == 0) & (target != 2)
        target2[under_cost0] = 1 - target2[under_cost0]
        loss2, grad2 = _loss_and_grad(masked_bce_dice, logits2, target2, weight, pos_weight=pw)
        assert torch.allclose(loss, loss2, rtol=1e-14, atol=0)
        assert torch.allclose(grad[valid], grad2[valid], rtol=1e-12, atol=1e-300)
        assert torch.all(grad2[~valid] == 0)


def test_ce_dice_ignore_invariance():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5, 6))
    target[torch.rand(2, 4, 5, 6) < 0.2] = -100
    weight = torch.rand(2, 4, 5, 6, dtype=torch.float64) + 0.5
    weight[torch.rand(2, 4, 5, 6) < 0.2] = 0.0
    valid = (target != -100) & (weight > 0)
    vc = valid.unsqueeze(1).expand_as(logits)
    loss, grad = _loss_and_grad(masked_ce_dice, logits, target, weight)
    assert torch.isfinite(loss) and loss > 0
    assert torch.all(grad[~vc] == 0) and torch.any(grad[vc] != 0)
    logits2 = logits.clone()
    logits2[~vc] = torch.randn(int((~vc).sum()), dtype=torch.float64) * 1e3
    logits2[0, 0][~valid[0]] = math.nan
    target2 = target.clone()
    under_cost0 = (weight == 0) & (target != -100)
    target2[under_cost0] = (target2[under_cost0] + 1) % 3
    loss2, grad2 = _loss_and_grad(masked_ce_dice, logits2, target2, weight)
    assert torch.allclose(loss, loss2, rtol=1e-14, atol=0)
    assert torch.allclose(grad[vc], grad2[vc], rtol=1e-12, atol=1e-300)
    assert torch.all(grad2[~vc] == 0)


def test_all_ignored_gives_zero_loss_and_gradient():
    logits = torch.randn(2, 1, 4, 4)
    loss, grad = _loss_and_grad(masked_bce_dice, logits, torch.full((2, 1, 4, 4), 2),
                                pos_weight="auto")
    assert loss.item() == 0.0 and torch.all(grad == 0)
    loss, grad = _loss_and_grad(masked_bce_dice, logits, torch.ones(2, 1, 4, 4),
                                torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0 and torch.all(grad == 0)
    logits = torch.randn(2, 3, 4, 4)
    loss, grad = _loss_and_grad(masked_ce_dice, logits, torch.full((2, 4, 4), -100))
    assert loss.item() == 0.0 and torch.all(grad == 0)
    loss, grad = _loss_and_grad(masked_ce_dice, logits, torch.full((2, 4, 4), 5),
                                ignore_index=5)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_ce_matches_torch_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 5, 6))
    target[torch.rand(3, 5, 6) < 0.25] = 255
    got = masked_ce_dice(logits, target, ignore_index=255, dice_weight=0.0)
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(got, ref, rtol=1e-12)
    # cost 0 acts as the ignore label
    weight = (torch.rand(3, 5, 6) > 0.4).double()
    got = masked_ce_dice(logits, target, weight, ignore_index=255, dice_weight=0.0)
    ref = F.cross_entropy(logits, torch.where(weight > 0, target, 255), ignore_index=255)
    assert torch.allclose(got, ref, rtol=1e-12)
    # positive costs scale the per-voxel terms; the mean divides by the valid count
    weight = weight * (1 + torch.rand(3, 5, 6, dtype=torch.float64))
    valid = (target != 255) & (weight > 0)
    per = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none")
    ref = (per * weight)[valid].sum() / valid.sum()
    got = masked_ce_dice(logits, target, weight, ignore_index=255, dice_weight=0.0)
    assert torch.allclose(got, ref, rtol=1e-12)


def test_ce_dice_part_matches_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 4, 5))
    target = rng.integers(0, 3, size=(2, 4, 5))
    target[0, 0, :3] = -100
    target[target == 2] = 0  # class 2 absent from the target
    valid = target != -100
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    eps = 1e-6
    dices = []
    for c in range(3):
        pc = p[:, c][valid]
        tc = (target[valid] == c).astype(float)
        dices.append((2 * (pc * tc).sum() + eps) / (pc.sum() + tc.sum() + eps))
    ce_only = masked_ce_dice(torch.from_numpy(logits), torch.from_numpy(target), dice_weight=0)
    both = masked_ce_dice(torch.from_numpy(logits), torch.from_numpy(target), dice_weight=2.0)
    assert (both - ce_only).item() == pytest.approx(2 * (1 - np.mean(dices)), rel=1e-10)


def test_loss_input_errors():
    with pytest.raises(InputError, match="binary target values"):
        masked_bce_dice(torch.zeros(1, 1, 3), torch.tensor([[[0, 1, 3]]]))
    with pytest.raises(OptionError, match="does not match"):
        masked_bce_dice(torch.zeros(1, 1, 3), torch.zeros(1, 1, 4))
    with pytest.raises(OptionError, match=r"\(N, 1, \.\.\.\)"):
        masked_bce_dice(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        masked_ce_dice(torch.zeros(1, 3, 2), torch.tensor([[0, 3]]))
    with pytest.raises(OptionError, match="integer class map"):
        masked_ce_dice(torch.zeros(1, 3, 2), torch.zeros(1, 2))


# ----------------------------------------------------------------------------- metrics


def test_dice_iou_hand_computed():
    pred = torch.tensor([1, 1, 0, 0, 1, 0])
    target = torch.tensor([1, 0, 1, 2, 2, 0])  # valid 0..2 and 5: tp 1, fp 1, fn 1
    assert dice_iou(pred, target) == pytest.approx((0.5, 1 / 3))
    weight = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # masks the false positive
    assert dice_iou(pred.numpy(), target.numpy(), weight=weight) == pytest.approx((2 / 3, 0.5))
    assert dice_iou(np.zeros(4), np.array([0, 2, 0, 0])) == (1.0, 1.0)
    assert dice_iou(np.ones(2, bool), np.array([0, 0])) == (0.0, 0.0)


def test_dice_iou_matches_numpy_reference():
    rng = np.random.default_rng(5)
    pred = rng.random((3, 8, 9)) > 0.5
    target = rng.integers(0, 3, size=(3, 8, 9))
    weight = rng.random((3, 8, 9)) * (rng.random((3, 8, 9)) > 0.2)
    keep = (target != 2) & (weight > 0)
    p, t = pred[keep], target[keep] == 1
    inter = np.logical_and(p, t).sum()
    ref_dice = 2 * inter / (p.sum() + t.sum())
    ref_iou = inter / np.logical_or(p, t).sum()
    dice, iou = dice_iou(torch.from_numpy(pred), torch.from_numpy(target),
                         weight=torch.from_numpy(weight))
    assert dice == pytest.approx(ref_dice, rel=1e-12)
    assert iou == pytest.approx(ref_iou, rel=1e-12)
