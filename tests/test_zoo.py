"""BioImage Model Zoo packages: a trained model exported, validated by bioimageio.spec and
run by bioimageio.core (offline); packages run blockwise by ``voxelmill predict`` equal the
checkpoint's prediction and bioimageio.core's whole-volume prediction; bad and untrusted
packages are refused before anything is written."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from engine.errors import InputError
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.predict import PredictOptions, plan_prediction, predict
from engine.zoo.architecture import architecture_source
from tests.conftest import run_cli

#: a network voxelmill does not know: its package needs --trust-architecture-code
ARCH = """import torch


class Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.a = torch.nn.Conv3d(1, width, 3, padding=1)
        self.b = torch.nn.Conv3d(width, 1, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _probabilities(src: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(src / "predictions" / name / "0"), mode="r")[:].astype(
        np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, client) -> dict:
    """A 3D image with labels, a U-Net trained on it for a few iterations, and its package
    exported by the CLI (the README's command)."""
    from engine.learn.config import parse_config
    from engine.learn.train import train

    pytest.importorskip("bioimageio.spec")  # export validates with it (reading needs none)
    tmp = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (24, 40, 36)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[6:18, 10:30, 8:28] = 1
    image[labels > 0] += 40
    tifffile.imwrite(tmp / "img.ome.tif", image, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                               "PhysicalSizeZ": 1.0})
    tifffile.imwrite(tmp / "labels.tif", labels)
    convert(tmp / "img.ome.tif", tmp / "img.ome.zarr", ConvertOptions(
        chunks=(8, 8, 12), labels=(("truth", str(tmp / "labels.tif")),)), client,
        report=lambda line: None)
    cfg = {"output": str(tmp / "run"),
           "data": {"train": [{"path": str(tmp / "img.ome.zarr"), "labels": "truth"}],
                    "patch_shape": [16, 16, 16], "normalization": {"mode": "meanstd"}},
           "model": {"features": [4, 8], "norm": "instance"},
           "train": {"iterations": 4, "batch_size": 2, "val_every": 2, "device": "cpu"}}
    train(parse_config(cfg, "test", tmp), client, report=lambda line: None)
    ckpt = tmp / "run" / "best.pt"
    r = run_cli("model", "export", str(ckpt), str(tmp / "nuclei.zip"), "--format",
                "bioimageio", "--author", "Ada Lovelace")
    assert r.returncode == 0, r.stderr
    return {"tmp": tmp, "src": tmp / "img.ome.zarr", "image": image, "ckpt": ckpt,
            "zip": tmp / "nuclei.zip", "export_stderr": r.stderr}


def test_export_validates_and_bioimageio_core_reproduces(trained):
    """The package passes bioimageio.spec with no warning, carries what the issue lists,
    and bioimageio.core (offline) reproduces its test output with both weight formats."""
    pytest.importorskip("bioimageio.core")
    from bioimageio.core import test_model

    from engine.zoo.export import NO_GITHUB_USER, validate_format

    # the one warning left: no GitHub account named (bioimageio.spec checks those online)
    warned = [line for line in trained["export_stderr"].splitlines() if "bioimageio.spec:" in line]
    assert len(warned) == 1 and NO_GITHUB_USER in warned[0]
    assert [NO_GITHUB_USER in w for w in validate_format(trained["zip"])] == [True]
    with zipfile.ZipFile(trained["zip"]) as zf:
        names = set(zf.namelist())
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        assert zf.read("voxelmill_unet.py") == architecture_source()
    assert {"weights.pt", "weights.torchscript.pt", "test_input.npy", "test_output.npy",
            "cover.png", "config.yaml", "metrics.json", "README.md"} <= names
    space = rdf["inputs"][0]["axes"][2:]
    assert [(a["id"], a["scale"], a["unit"]) for a in space] == [
        ("z", 1.0, "micrometer"), ("y", 0.5, "micrometer"), ("x", 0.5, "micrometer")]
    assert rdf["inputs"][0]["preprocessing"][-1]["id"] == "scale_linear"
    assert rdf["outputs"][0]["postprocessing"] == [{"id": "sigmoid"}]
    assert rdf["authors"] == [{"name": "Ada Lovelace"}]
    for weights in ("pytorch_state_dict", "torchscript"):
        summary = test_model(trained["zip"], weight_format=weights, devices=["cpu"])
        failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details
                  if d.status != "passed"]
        assert summary.status == "passed", failed


def test_package_predicts_like_its_checkpoint(trained, client):
    """``voxelmill predict --model PACKAGE`` equals ``--model CHECKPOINT --norm checkpoint``
    within float16 storage; ``model info`` describes the package (README commands)."""
    src = trained["src"]
    r = run_cli("predict", str(src), "--model", str(trained["zip"]), "--name", "zoo",
                "--tile", "16", "--block", "16,16,24", "--probabilities", "float16",
                "--workers", "1", "--threads-per-worker", "2")
    assert r.returncode == 0, r.stderr
    predict(src, PredictOptions(trained["ckpt"], "ck", tile=(16, 16, 16), block=(16, 16, 24),
                                probabilities="float16", norm="checkpoint"), client,
            report=lambda line: None)
    np.testing.assert_allclose(_probabilities(src, "zoo"), _probabilities(src, "ck"),
                               atol=2e-3)
    r = run_cli("model", "info", str(trained["zip"]))
    assert r.returncode == 0, r.stderr
    assert "bioimage.io format 0.5" in r.stdout and "voxelmill_unet" in r.stdout


def test_export_class_model_from_sample(trained, tmp_path):
    """A class model whose training data is gone: refused until --sample names an image;
    then softmax postprocessing, channel names from the classes, and bioimageio.core
    reproduces the test output."""
    pytest.importorskip("bioimageio.core")
    from bioimageio.core import test_model

    from engine.learn.checkpoint import save_checkpoint
    from engine.learn.unet import UNet, receptive_field
    from engine.zoo.export import PackageInfo, export_package

    torch.manual_seed(0)
    model = UNet(3, 1, 3, features=(4, 8), norm="batch").eval()
    meta = {"arch": {"name": "unet", **model.arch()},
            "input": {"channels": ["raw"], "normalization": {"mode": "percentile",
                                                             "low": 1.0, "high": 99.0},
                      "stats": [{"name": "x", "offset": [90.0], "scale": [60.0]}]},
            "target": {"kind": "classes", "classes": ["background", "rim", "core"],
                       "activation": "softmax"},
            "patch_shape": [8, 16, 16], "divisor": list(model.divisor),
            "receptive_field": list(receptive_field(model)), "voxel_size": [1.0, 0.5, 0.5],
            "unit": "micrometer", "config": {"data": {"train": [
                {"path": str(tmp_path / "gone.ome.zarr")}]}}}
    save_checkpoint(tmp_path / "classes.pt", model.state_dict(), meta)
    info = PackageInfo(authors=("Test",), cite=(("A paper", "10.1000/xyz"),))
    with pytest.raises(InputError, match="--sample IMAGE"):
        export_package(tmp_path / "classes.pt", tmp_path / "c.zip", info)
    assert not (tmp_path / "c.zip").exists()
    out, _ = export_package(tmp_path / "classes.pt", tmp_path / "c.zip", info,
                            sample=trained["src"])
    with zipfile.ZipFile(out) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        x = np.load(io.BytesIO(zf.read("test_input.npy")))
    assert x.shape == (1, 1, 8, 16, 16)
    assert rdf["outputs"][0]["postprocessing"] == [{"id": "softmax",
                                                    "kwargs": {"axis": "channel"}}]
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["background", "rim", "core"]
    assert rdf["cite"] == [{"text": "A paper", "doi": "10.1000/xyz"}]
    assert test_model(out, weight_format="torchscript", devices=["cpu"]).status == "passed"


@pytest.fixture(scope="module")
def handmade(tmp_path_factory, client) -> dict:
    """A package made by hand: a foreign 3D network (state dict + its architecture file),
    zero_mean_unit_variance preprocessing, sigmoid, an output halo of 2; and an image."""
    tmp = tmp_path_factory.mktemp("handmade")
    rng = np.random.default_rng(1)
    image = rng.normal(50, 5, (24, 40, 36)).astype(np.float32)
    image[:, 20:] *= 3  # global statistics differ from any block's
    tifffile.imwrite(tmp / "img.ome.tif", image, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0,
                               "PhysicalSizeZ": 1.0})
    convert(tmp / "img.ome.tif", tmp / "img.ome.zarr", ConvertOptions(chunks=(8, 8, 12)),
            client, report=lambda line: None)
    pkg = tmp / "pkg"
    pkg.mkdir()
    (pkg / "net.py").write_text(ARCH)
    namespace: dict = {}
    exec(compile(ARCH, "net.py", "exec"), namespace)  # the test's own code, not a package's
    torch.manual_seed(0)
    net = namespace["Net"](width=4).eval()
    torch.save(net.state_dict(), pkg / "weights.pt")
    x = rng.normal(0, 1, (1, 1, 8, 8, 8)).astype(np.float32)
    np.save(pkg / "in.npy", x)
    norm = (x - x.mean()) / (x.std() + 1e-6)
    with torch.no_grad():
        np.save(pkg / "out.npy", torch.sigmoid(net(torch.from_numpy(norm))).numpy())
    space_in = [{"type": "space", "id": a, "size": {"min": 8, "step": 4}, "scale": 1.0,
                 "unit": "micrometer"} for a in "zyx"]
    space_out = [{"type": "space", "id": a, "size": {"tensor_id": "raw", "axis_id": a},
                  "scale": 1.0, "unit": "micrometer", "halo": 2} for a in "zyx"]
    rdf = {
        "type": "model", "format_version": "0.5.4", "name": "hand made",
        "description": "a small network made by hand", "authors": [{"name": "Test"}],
        "cite": [{"text": "none", "url": "https://example.org"}], "license": "MIT",
        "inputs": [{"id": "raw", "axes": [{"type": "batch"},
                                          {"type": "channel", "channel_names": ["raw"]},
                                          *space_in],
                    "test_tensor": {"source": "in.npy", "sha256": _sha(pkg / "in.npy")},
                    "preprocessing": [{"id": "zero_mean_unit_variance",
                                       "kwargs": {"axes": ["z", "y", "x"]}}]}],
        "outputs": [{"id": "fg", "axes": [{"type": "batch"},
                                          {"type": "channel", "channel_names": ["fg"]},
                                          *space_out],
                     "test_tensor": {"source": "out.npy", "sha256": _sha(pkg / "out.npy")},
                     "postprocessing": [{"id": "sigmoid"}]}],
        "weights": {"pytorch_state_dict": {
            "source": "weights.pt", "sha256": _sha(pkg / "weights.pt"),
            "architecture": {"source": "net.py", "sha256": _sha(pkg / "net.py"),
                             "callable": "Net", "kwargs": {"width": 4}},
            "pytorch_version": "2.0"}},
    }
    (pkg / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return {"tmp": tmp, "src": tmp / "img.ome.zarr", "image": image, "pkg": pkg, "rdf": rdf}


def test_handmade_package_blockwise_equals_bioimageio_core(handmade, client):
    """The hand-made package run blockwise (halo as the minimum overlap, global
    zero-mean-unit-variance) equals bioimageio.core's prediction of the whole volume."""
    pytest.importorskip("bioimageio.core")
    from bioimageio.core import Tensor, load_model_description
    from bioimageio.core import predict as core_predict

    src, rdf_file = handmade["src"], handmade["pkg"] / "rdf.yaml"
    plan = plan_prediction(src, PredictOptions(rdf_file, "hm", tile=(16, 16, 16), overlap=0.0,
                                               trust_code=True))
    assert plan.grid.stride == (12, 12, 12) and plan.grid.trim == (2, 2, 2)
    for name, block in (("hm", (8, 16, 12)), ("hm2", (16, 8, 24))):  # two layouts
        predict(src, PredictOptions(handmade["pkg"] if name == "hm2" else rdf_file, name,
                                    tile=(16, 16, 16), overlap=0.0, block=block,
                                    probabilities="float16", trust_code=True),
                client, report=lambda line: None)
    descr = load_model_description(rdf_file)
    x = Tensor.from_numpy(handmade["image"][None, None], dims=("batch", "channel", "z", "y",
                                                               "x"))
    sample = core_predict(model=descr, inputs={"raw": x})
    reference = sample.members["fg"].data.to_numpy()[0]
    # bioimageio.core pads the volume's border by the halo (and drops it again) where a
    # whole-volume run of the network pads with zeros: compare inside that border
    inner = (slice(None), *(slice(2, -2),) * 3)
    for name in ("hm", "hm2"):
        np.testing.assert_allclose(_probabilities(src, name)[inner], reference[inner],
                                   atol=2e-3)


def _variant(handmade: dict, tmp: Path, edit) -> Path:
    """A copy of the hand-made package folder changed by ``edit(folder, rdf)``."""
    dst = tmp / f"pkg{len(list(tmp.glob('pkg*')))}"
    shutil.copytree(handmade["pkg"], dst)
    rdf = json.loads(json.dumps(handmade["rdf"]))
    edit(dst, rdf)
    (dst / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return dst


def test_bad_and_untrusted_packages_refused(handmade, tmp_path):
    """Missing weights, only unsupported weights, wrong axes, a tampered rdf.yaml, an
    architecture needing an unlisted module, and (without the flag) any package code:
    one line, exit 2, nothing written, and the package's code never ran."""
    marker = tmp_path / "ran"

    def missing(d, r):
        (d / "weights.pt").unlink()

    def onnx(d, r):
        r["weights"] = {"onnx": {"source": "weights.pt", "opset_version": 15}}

    def axes(d, r):
        r["inputs"][0]["axes"] = [r["inputs"][0]["axes"][i] for i in (0, 2, 3, 4, 1)]

    def tampered(d, r):  # rdf.yaml edited: the weights no longer fit
        r["weights"]["pytorch_state_dict"]["architecture"]["kwargs"] = {"width": 8}

    def swapped(d, r):  # a file replaced after the package was made
        (d / "net.py").write_text(ARCH.replace("padding=1", "padding=2", 1))

    def unlisted(d, r):
        code = "import voxelmill_no_such_module\n" + ARCH
        (d / "net.py").write_text(code)
        r["weights"]["pytorch_state_dict"]["architecture"]["sha256"] = _sha(d / "net.py")

    def side_effect(d, r):
        code = f"open({str(marker)!r}, 'w').close()\n" + ARCH
        (d / "net.py").write_text(code)
        r["weights"]["pytorch_state_dict"]["architecture"]["sha256"] = _sha(d / "net.py")

    cases = [(missing, True, "no file 'weights.pt'"),
             (onnx, True, "runs pytorch_state_dict or torchscript weights only"),
             (axes, True, "supports batch, [channel,] then z, y, x"),
             (tampered, True, "the weights do not fit the architecture"),
             (swapped, True, "net.py does not match its sha256"),
             (unlisted, True, "needs the module voxelmill_no_such_module"),
             (side_effect, False, "--trust-architecture-code")]
    for edit, trust, message in cases:
        pkg = _variant(handmade, tmp_path, edit)
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")):
            plan_prediction(handmade["src"], PredictOptions(pkg, "bad", trust_code=trust))
    assert not marker.exists()  # the untrusted package's code never ran
    for pkg, extra in ((tmp_path / "pkg0", ["--trust-architecture-code"]),
                       (tmp_path / "pkg6", [])):
        r = run_cli("predict", str(handmade["src"]), "--model", str(pkg), "--name", "bad",
                    *extra)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not (handmade["src"] / "predictions" / "bad").exists()
        assert not (handmade["src"] / "labels" / "bad").exists()
    assert not marker.exists()
    r = run_cli("model", "info", str(tmp_path / "pkg6"))  # described, never run
    assert r.returncode == 0 and "--trust-architecture-code" in r.stdout and not marker.exists()


def test_which_code_runs(trained, handmade, tmp_path):
    """No flag needed for TorchScript weights, nor for state-dict weights whose architecture
    file is byte for byte voxelmill's (built from voxelmill's own UNet); one changed byte
    and the package's code would run, so the flag is needed."""
    from engine.learn.unet import UNet
    from engine.zoo.package import load_package

    folder = tmp_path / "exported"
    with zipfile.ZipFile(trained["zip"]) as zf:
        zf.extractall(folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    del rdf["weights"]["torchscript"]
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    model, meta = load_package(folder)
    assert meta["zoo"]["weights"] == "voxelmill_unet" and isinstance(model.net, UNet)
    source = folder / "voxelmill_unet.py"
    source.write_bytes(source.read_bytes() + b"\n")
    rdf["weights"]["pytorch_state_dict"]["architecture"]["sha256"] = _sha(source)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    with pytest.raises(InputError, match="--trust-architecture-code"):
        load_package(folder)
    # the hand-made (foreign) network as TorchScript beside its state dict: no flag
    pkg = tmp_path / "ts"
    shutil.copytree(handmade["pkg"], pkg)
    rdf = json.loads(json.dumps(handmade["rdf"]))
    namespace: dict = {}
    exec(compile(ARCH, "net.py", "exec"), namespace)
    net = namespace["Net"](width=4).eval()
    net.load_state_dict(torch.load(pkg / "weights.pt", weights_only=True))
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 8, 8, 8)), str(pkg / "net.ts"))
    rdf["weights"]["torchscript"] = {"source": "net.ts", "sha256": _sha(pkg / "net.ts"),
                                     "pytorch_version": "2.0"}
    (pkg / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    model, meta = load_package(pkg)
    assert meta["zoo"]["weights"] == "torchscript"
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))


def test_trimmed_tile_grid():
    """A package's halo: tiles overlap by at least twice the halo, and each tile's halo is
    left out of the blend except on faces at the volume's border, so every voxel is still
    covered by the kept part of some tile."""
    from engine.predict.tiling import TileGrid

    grid = TileGrid.make((50,), (16,), 0.0, (4,), trim=(3,))
    assert grid.stride == (10,) and grid.starts() == [[0, 10, 20, 30, 34]]
    kept = [grid.kept((s,))[0] for s in grid.starts()[0]]
    assert kept[0] == slice(0, 13) and kept[-1] == slice(37, 50)  # border faces kept
    assert kept[1] == slice(13, 23)
    covered = np.zeros(50, bool)
    for k in kept:
        covered[k] = True
    assert covered.all()
    assert TileGrid.make((10,), (16,), 0.0, (4,), trim=(3,)).kept((0,)) == (slice(0, 12),)
