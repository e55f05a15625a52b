"""Models from checkpoints and TorchScript files, export, info, curves, in-memory prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import DestinationError, InputError
from engine.learn.checkpoint import save_checkpoint
from engine.learn.curves import plot_curves
from engine.learn.model import describe, export_torchscript, load_model
from engine.learn.unet import UNet, receptive_field
from tests.conftest import run_cli


def _checkpoint(path: Path, spatial_dims: int = 2, **arch: object) -> tuple[UNet, dict]:
    torch.manual_seed(0)
    model = UNet(spatial_dims, 2, 1, features=(4, 8, 16), **arch).eval()
    patch = [32] * spatial_dims
    meta = {
        "arch": {"name": "unet", **model.arch()},
        "input": {"channels": ["a", "b"], "normalization": {"mode": "meanstd", "low": 1.0,
                                                          "high": 99.8},
                  "stats": [{"name": "v", "offset": [0.0, 0.0], "scale": [1.0, 1.0]}]},
        "target": {"kind": "binary", "classes": ["background", "foreground"],
                   "activation": "sigmoid"},
        "patch_shape": patch, "divisor": list(model.divisor),
        "receptive_field": list(receptive_field(model)), "voxel_size": [0.5] * spatial_dims,
        "unit": "micrometer", "iteration": 10,
        "best": {"iteration": 10, "val_dice": 0.75, "val_iou": 0.6, "val_loss": 0.3},
        "history": [{"iteration": 5, "loss": 0.9, "lr": 1e-3},
                    {"iteration": 10, "loss": 0.5, "lr": 1e-3, "val_loss": 0.3,
                     "val_dice": 0.75, "val_iou": 0.6}],
    }
    save_checkpoint(path, model.state_dict(), meta)
    return model, meta


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_torchscript_export_gives_the_same_outputs(tmp_path, spatial_dims):
    model, meta = _checkpoint(tmp_path / "best.pt", spatial_dims)
    ts = export_torchscript(tmp_path / "best.pt", tmp_path / "model.ts.pt")
    loaded, ts_meta = load_model(ts)
    assert ts_meta["format"] == "torchscript" and ts_meta["arch"] == meta["arch"]
    plain = torch.jit.load(str(ts))  # needs no voxelmill code
    for shape in ([32] * spatial_dims, [48] + [64] * (spatial_dims - 1)):
        x = torch.randn(2, 2, *shape)
        with torch.no_grad():
            expected = model(x)
            assert torch.allclose(loaded(x), expected, atol=1e-5)
            assert torch.allclose(plain(x), expected, atol=1e-5)
    with pytest.raises(DestinationError, match="--overwrite"):
        export_torchscript(tmp_path / "best.pt", ts)
    export_torchscript(tmp_path / "best.pt", ts, overwrite=True)


def test_checkpoint_loads_weights(tmp_path):
    model, _ = _checkpoint(tmp_path / "best.pt")
    loaded, meta = load_model(tmp_path / "best.pt")
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert meta["best"]["val_dice"] == 0.75


def test_refusals(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(InputError, match="junk.pt"):
        load_model(junk)
    pickled = tmp_path / "pickled.pt"
    torch.save(UNet(2, 1, 1, features=(4, 8)), pickled)  # a whole pickled module
    with pytest.raises(InputError, match="unpickling"):
        load_model(pickled)
    _, meta = _checkpoint(tmp_path / "a.pt")
    other = UNet(2, 2, 1, features=(4, 8))
    save_checkpoint(tmp_path / "mismatch.pt", other.state_dict(), meta)
    with pytest.raises(InputError, match="weights do not fit"):
        load_model(tmp_path / "mismatch.pt")
    save_checkpoint(tmp_path / "arch.pt", other.state_dict(), {**meta, "arch": {"name": "vit"}})
    with pytest.raises(InputError, match="unknown model architecture 'vit'"):
        load_model(tmp_path / "arch.pt")


def test_describe_and_cli(tmp_path):
    _, meta = _checkpoint(tmp_path / "best.pt")
    lines = describe(meta)
    assert any("a, b" in line and "meanstd" in line for line in lines)
    assert any("best validation Dice 0.750" in line for line in lines)
    res = run_cli("model", "info", str(tmp_path / "best.pt"))
    assert res.returncode == 0, res.stderr
    assert "receptive field" in res.stdout and "binary" in res.stdout
    res = run_cli("model", "info", str(tmp_path / "best.pt"), "--json")
    assert json.loads(res.stdout)["patch_shape"] == [32, 32]
    res = run_cli("model", "export", str(tmp_path / "best.pt"), str(tmp_path / "m.ts"))
    assert res.returncode == 0 and (tmp_path / "m.ts").is_file()
    res = run_cli("model", "info", str(tmp_path / "m.ts"))
    assert "exported   TorchScript" in res.stdout
    res = run_cli("model", "export", str(tmp_path / "best.pt"), str(tmp_path / "m.ts"))
    assert res.returncode == 2 and "--overwrite" in res.stderr
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    res = run_cli("model", "info", str(tmp_path / "bad.pt"))
    assert res.returncode == 2 and "bad.pt" in res.stderr and "Traceback" not in res.stderr


def test_curves_png(tmp_path):
    import matplotlib.image

    history = [{"iteration": i, "loss": 1 / i, "lr": 1e-3} for i in range(1, 5)]
    history += [{"iteration": 5, "loss": 0.1, "val_loss": 0.2, "val_dice": 0.8,
                 "val_iou": 0.7}]
    out = plot_curves(history, tmp_path / "curves.png", title="run")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (360, 900)
    assert img[..., :3].std() > 0.05  # something is drawn
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary left
