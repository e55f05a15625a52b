"""Training: the seeds' central claim on the phantom slide, resume, early stop, targets,
ignore masking through the model, the CLI, and training as a task on a GPU-resourced worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from skimage.segmentation import find_boundaries

from engine.errors import DestinationError, InputError, OptionError
from engine.learn.checkpoint import load_checkpoint
from engine.learn.config import parse_config
from engine.learn.data import IGNORE
from engine.learn.model import load_model
from engine.learn.normalize import ChannelStats, apply_stats
from engine.learn.train import (
    learning_rate,
    make_targets,
    plan_training,
    run_training,
    train,
    train_on_cluster,
)
from engine.phantoms import low_light, phantom_slide
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.predict import PredictOptions, predict
from engine.pipelines.segment import SegmentOptions, segment
from tests.conftest import dask_processes, run_cli

ROWS, COLS = 512, 640
#: cell bodies from a membrane stain: the rims and the faint cytoplasm, smoothed, filled
CELLS_WORKFLOW = """
steps:
  - {name: smooth, function: gaussian, parameters: {sigma: 4.0}}
  - {name: mask, function: threshold, parameters: {method: otsu}}
  - {name: filled, function: fill_holes, parameters: {max_size: 2000}}
  - {name: label, function: label}
"""


def _held(result) -> tuple[slice, ...]:
    """The region validation held out of training (a slab chosen by its foreground)."""
    return tuple(slice(a, b) for a, b in result.validation[0]["region"])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def slide(tmp_path_factory, client) -> dict:
    """The phantom slide plus a low-light DAPI acquisition, as OME-Zarr, with labels from
    the classic nucleus workflow on the good DAPI channel ("auto") and on the low-light one
    ("classic")."""
    tmp = tmp_path_factory.mktemp("slide")
    image, nuclei, cells, names = phantom_slide((ROWS, COLS), seed=2)
    image = np.concatenate([image, low_light(image[0], seed=3, noise=0.5)[None]])
    names = (*names, "DAPI_lowlight")
    tif = tmp / "slide.ome.tif"
    tifffile.imwrite(tif, image, ome=True, photometric="minisblack", metadata={
        "axes": "CYX", "Channel": {"Name": list(names)}, "PhysicalSizeX": 0.2,
        "PhysicalSizeY": 0.2})
    tifffile.imwrite(tmp / "nuclei.tif", nuclei)
    tifffile.imwrite(tmp / "cells.tif", cells)
    zpath = tmp / "slide.ome.zarr"
    convert(tif, zpath, ConvertOptions(chunks=(256,), labels=(
        ("truth", str(tmp / "nuclei.tif")), ("cells_truth", str(tmp / "cells.tif")))),
            client, report=lambda line: None)
    (tmp / "cells.yaml").write_text(CELLS_WORKFLOW)
    for workflow, channel, name in (("nucleus", "DAPI", "auto"),
                                    ("nucleus", "DAPI_lowlight", "classic"),
                                    (str(tmp / "cells.yaml"), "membrane", "cells_auto"),
                                    (str(tmp / "cells.yaml"), "brightfield", "cells_classic")):
        segment(zpath, SegmentOptions(workflow, name, channel=channel), client,
                report=lambda line: None)
    read = {k: zarr.open_array(str(zpath / "labels" / k / "0"), mode="r")[...]
            for k in ("truth", "auto", "classic", "cells_truth", "cells_auto", "cells_classic")}
    return {"path": zpath, "image": image, "names": names, **read, "tmp": tmp}


def _claims_config(slide: dict, out: Path, **train: object) -> dict:
    return {
        "output": str(out),
        "data": {"train": [{"path": str(slide["path"]), "labels": "auto",
                            "channels": ["DAPI_lowlight"]}],
                 "val_fraction": 0.2, "patch_shape": [64, 64], "val_crops": 32},
        "model": {"features": [8, 16, 32]},
        "augment": {"flip": {"p": 0.5}, "rot90": {"p": 0.5},
                    "noise": {"p": 0.5, "sigma": [0.0, 0.3]}},
        "train": {"iterations": 600, "batch_size": 8, "lr": 0.003, "val_every": 150,
                  "device": "cpu", **train},
    }


def _predict_whole(ckpt: Path, image: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """The model over the whole slide in one pass, normalized with the stored statistics."""
    model, meta = load_model(ckpt)
    channels = [names.index(c) for c in meta["input"]["channels"]]
    stats = ChannelStats.from_dict({k: v for k, v in meta["input"]["stats"][0].items()
                                    if k != "name"})
    x = apply_stats(image[channels].astype(np.float32), stats)
    with torch.no_grad():
        logits = model(torch.from_numpy(x[None]))
    return logits[0, 0].numpy() > 0


def test_model_on_lowlight_channel_beats_classic_workflow(slide, client, tmp_path):
    """Labels from the classic workflow on the good channel train a network on the low-light
    channel that segments it better than the classic workflow does, on held-out rows."""
    truth = slide["truth"] > 0
    assert _dice(slide["auto"] > 0, truth) > 0.95  # the automatic labels are good
    cfg = parse_config(_claims_config(slide, tmp_path / "run"), "test", tmp_path)
    result = train(cfg, client)
    assert result.best["val_dice"] > 0.7
    pred = _predict_whole(tmp_path / "run" / "best.pt", slide["image"], slide["names"])
    held = _held(result)
    model_dice = _dice(pred[held], truth[held])
    classic_dice = _dice(slide["classic"][held] > 0, truth[held])
    print(json.dumps({"held": str(held), "model_dice": round(model_dice, 3),
                      "classic_dice": round(classic_dice, 3),
                      "val_dice": round(result.best["val_dice"], 3),
                      "seconds": round(result.seconds, 1)}))
    # measured on this machine: model 0.90, classic 0.72
    assert model_dice > classic_dice + 0.12
    assert model_dice > 0.8
    # outputs: metrics, curves, config, checkpoint metadata that inference needs
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["iteration"] for h in metrics["history"]] == [150, 300, 450, 600]
    assert metrics["stopped"] == "completed"
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # voxelmill predict (tiled, blockwise) with that model gives the validation Dice: both
    # predict the region with the same tiles
    pred = predict(slide["path"], PredictOptions(tmp_path / "run" / "best.pt", "lowlight_unet",
                                                 block=(256, 256)), client,
                   report=lambda line: None)
    tiled = zarr.open_array(str(pred.labels / "0"), mode="r")[...] > 0
    auto = slide["auto"] > 0  # the validation target
    assert abs(_dice(tiled[held], auto[held]) - result.best["val_dice"]) <= 0.005
    # tiles blended with Gaussian weights are no worse than one whole-image forward pass
    # (they can be better: 0.92 vs 0.90 with one torch thread)
    assert _dice(tiled[held], truth[held]) > model_dice - 0.02
    meta = load_checkpoint(tmp_path / "run" / "best.pt").metadata
    assert meta["input"]["channels"] == ["DAPI_lowlight"]
    assert meta["input"]["normalization"]["mode"] == "percentile"
    assert meta["patch_shape"] == [64, 64] and meta["divisor"] == [4, 4]
    assert meta["receptive_field"][0] > 10
    assert meta["voxel_size"] == pytest.approx([0.2, 0.2])
    assert meta["best"]["iteration"] == metrics["best"]["iteration"]


def test_cross_channel_transmitted_light_from_fluorescence_labels(slide, client, tmp_path):
    """MISIC's / PartSeg's scheme: labels from the membrane fluorescence train a network
    whose input is the transmitted-light channel alone, with the class-weighted loss."""
    truth = slide["cells_truth"] > 0
    cfg = _claims_config(slide, tmp_path / "run", iterations=400, val_every=200)
    cfg["data"]["train"] = [{"path": str(slide["path"]), "labels": "cells_auto",
                             "channels": ["brightfield"]}]
    cfg["loss"] = {"pos_weight": "auto"}
    result = train(parse_config(cfg, "test", tmp_path), client)
    pred = _predict_whole(tmp_path / "run" / "best.pt", slide["image"], slide["names"])
    held = _held(result)
    model_dice = _dice(pred[held], truth[held])
    labels_dice = _dice(slide["cells_auto"][held] > 0, truth[held])
    classic_dice = _dice(slide["cells_classic"][held] > 0, truth[held])
    print(json.dumps({"model_dice": round(model_dice, 3), "labels_dice": round(labels_dice, 3),
                      "classic_brightfield_dice": round(classic_dice, 3),
                      "seconds": round(result.seconds, 1)}))
    # stated bar: the model on brightfield alone reaches Dice 0.75 with the true cells, far
    # above the same workflow on brightfield
    assert model_dice > 0.75
    assert model_dice > classic_dice + 0.25


def _small_config(slide: dict, out: Path, **train: object) -> dict:
    cfg = _claims_config(slide, out)
    cfg["data"]["val_crops"] = 4
    cfg["data"]["patch_shape"] = [32, 32]
    cfg["model"] = {"features": [4, 8]}
    cfg["train"] = {"iterations": 6, "batch_size": 2, "val_every": 2, "device": "cpu", **train}
    return cfg


TIMED = ("time_s", "data_wait_s", "step_s", "val_s", "data_wait_fraction")


def _untimed(history: list[dict]) -> list[dict]:
    """History entries without their wall-time fields."""
    return [{k: v for k, v in h.items() if k not in TIMED} for h in history]


def test_resume_continues_identically(slide, client, tmp_path):
    whole = parse_config(_small_config(slide, tmp_path / "whole"), "t", tmp_path)
    train(whole, client)
    half = parse_config(_small_config(slide, tmp_path / "half"), "t", tmp_path)

    def interrupt(event: dict) -> None:  # Ctrl-C during iteration 5; last.pt is from 4
        if event.get("iteration") == 5 and event["event"] == "iteration":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(half, client, events=interrupt)
    assert load_checkpoint(tmp_path / "half" / "last.pt").metadata["iteration"] == 4
    with pytest.raises(DestinationError, match="--resume"):
        train(half, client)
    result = train(half, client, resume=True)
    assert result.iterations == 6
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "half" / "last.pt")
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key
    assert _untimed(a.metadata["history"]) == _untimed(b.metadata["history"])
    changed = _small_config(slide, tmp_path / "half")
    changed["model"] = {"features": [4, 8, 16]}
    with pytest.raises(OptionError, match="model"):
        train(parse_config(changed, "t", tmp_path), client, resume=True)
    with pytest.raises(InputError, match="nothing to resume"):
        train(parse_config(_small_config(slide, tmp_path / "new"), "t", tmp_path), client,
              resume=True)


def test_early_stop_and_fine_tune(slide, client, tmp_path):
    cfg = parse_config(_small_config(slide, tmp_path / "a", lr=1e-12, patience=2,
                                     iterations=40), "t", tmp_path)
    result = train(cfg, client)
    # a learning rate that changes nothing cannot improve the first validation
    assert result.stopped == "early_stop" and result.iterations == 6
    tuned = parse_config(_small_config(slide, tmp_path / "b", init=str(tmp_path / "a" /
                                                                      "best.pt")), "t", tmp_path)
    plan = plan_training(tuned, client)
    first = load_checkpoint(tmp_path / "a" / "best.pt")
    assert plan.arch == {k: v for k, v in first.metadata["arch"].items() if k != "name"}
    wrong = _small_config(slide, tmp_path / "c", init=str(tmp_path / "a" / "best.pt"))
    wrong["target"] = {"kind": "boundary"}
    with pytest.raises(InputError, match="gives 1 output"):
        plan_training(parse_config(wrong, "t", tmp_path), client)


def test_patch_shape_not_divisible(slide, client, tmp_path):
    cfg = _small_config(slide, tmp_path / "a")
    cfg["data"]["patch_shape"] = [31, 32]
    with pytest.raises(OptionError, match=r"data.patch_shape: .*divisible by \(2, 2\)"):
        plan_training(parse_config(cfg, "t", tmp_path), client)
    assert not (tmp_path / "a").exists()


def test_targets() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (2, 12, 14)).astype(np.int64)
    label[0, :3] = IGNORE
    binary = make_targets(label, "binary", 2)
    assert binary.shape == (2, 1, 12, 14)
    assert np.array_equal(binary[:, 0], np.where(label == IGNORE, IGNORE, label > 0))
    both = make_targets(label, "boundary", 2)
    for b in range(2):
        lab = np.where(label[b] == IGNORE, 0, label[b])
        inner = find_boundaries(lab, mode="inner", connectivity=label.ndim - 1) & (lab > 0)
        valid = label[b] != IGNORE
        # ignored neighbours count as "another object": a boundary next to the unknown
        assert np.array_equal(both[b, 1][valid][3 * 14:], inner[valid][3 * 14:])
        assert np.all(both[b][:, ~valid] == IGNORE)
    classes = make_targets(label, "classes", 4)
    assert np.array_equal(classes, label)
    with pytest.raises(InputError, match="label value 3 is not a class index below 3"):
        make_targets(label, "classes", 3)


def test_learning_rate_schedule(tmp_path) -> None:
    base = {"output": "o", "data": {"train": [str(tmp_path)]}}
    cfg = parse_config({**base, "train": {"iterations": 100, "warmup": 10, "lr": 1.0}}, "t",
                       tmp_path)
    assert learning_rate(cfg, 5) == pytest.approx(0.5)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 100) == pytest.approx(0.02)
    assert learning_rate(cfg, 55) == pytest.approx(0.02 + 0.98 * 0.5)
    step = parse_config({**base, "train": {"iterations": 90, "schedule": "step", "lr": 1.0}},
                        "t", tmp_path)
    assert [learning_rate(step, i) for i in (1, 31, 61, 90)] == pytest.approx(
        [1.0, 0.1, 0.01, 0.01])


def test_cli_train_and_errors(slide, tmp_path):
    cfg = _small_config(slide, tmp_path / "run")
    cfg_file = tmp_path / "train.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(cfg))
    res = run_cli("train", str(cfg_file), "--iterations", "2", "--set", "train.val_every=1",
                  "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    assert "trained 2 iterations" in res.stdout
    assert "iteration 2: loss" in res.stderr
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert json.loads(ck["metadata"])["config"]["train"]["iterations"] == 2
    # again without --resume or --overwrite: refused, nothing changed
    before = (tmp_path / "run" / "last.pt").read_bytes()
    res = run_cli("train", str(cfg_file), "--iterations", "2")
    assert res.returncode == 2 and "--resume" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    # a bad config: every problem named, exit 2, nothing written
    res = run_cli("train", str(cfg_file), "--output", str(tmp_path / "bad"), "--set",
                  "train.lr=-1", "--set", "data.patch_shape=[3]", "--channels", "nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train.lr" in res.stderr and "data.patch_shape" in res.stderr
    assert not (tmp_path / "bad").exists()


def test_training_runs_on_the_gpu_resourced_worker(slide, tmp_path):
    """A real scheduler and two worker processes, one advertising GPU=1: the training task
    runs there (on its CPU here, with the worker's two threads: workers start with
    OMP_NUM_THREADS=1), streaming crops from the OME-Zarr store."""
    from distributed import Client

    cfg = parse_config(_small_config(slide, tmp_path / "run"), "t", tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    with dask_processes(logs, [[], ["--resources", "GPU=1", "--nthreads", "2"]]) as address, \
            Client(address) as c:
        gpu = [a for a, w in c.scheduler_info()["workers"].items() if w["resources"]]
        events: list[dict] = []
        plan = plan_training(cfg, c)
        result = train_on_cluster(plan, c, events.append, report=lambda line: None)
        assert result.worker == gpu[0]
        assert [e["event"] for e in events if e["event"] != "iteration"] == [
            "start", "validation", "validation", "validation", "end"]
        assert events[0]["threads"] == 2
        local = run_training(plan_training(
            parse_config(_small_config(slide, tmp_path / "local"), "t", tmp_path)))
    a = load_checkpoint(tmp_path / "run" / "last.pt").state_dict
    b = load_checkpoint(tmp_path / "local" / "last.pt").state_dict
    assert local.iterations == result.iterations == 6
    for key, value in a.items():
        assert torch.allclose(value, b[key], atol=1e-5), key


def test_a_training_whose_cluster_cannot_get_workers_stops_resumable(slide, client, tmp_path):
    """What the deployment knows and dask does not (SLURM jobs that ended before their
    worker joined: ``engine.slurmjobs``) stops a training on the cluster as it stops a
    pass: :class:`ClusterLost` naming it, saying the checkpoints are kept and how to go on;
    the training task stops too."""
    from engine.errors import ClusterLost
    from engine.stall import cluster_check

    looks: list[int] = []

    def ended(workers: dict) -> str | None:
        looks.append(len(workers))
        return "every SLURM worker job ended" if len(looks) >= 3 else None

    plan = plan_training(parse_config(_small_config(slide, tmp_path / "run", iterations=10**6),
                                      "t", tmp_path), client)
    with cluster_check(client, ended), pytest.raises(
            ClusterLost, match=r"^train: every SLURM worker job ended; its checkpoints are "
                               r"kept: run it again with --resume"):
        train_on_cluster(plan, client, report=lambda line: None)
    deadline = time.monotonic() + 30
    while client.processing() and any(client.processing().values()):
        assert time.monotonic() < deadline, "the training task went on"
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["boundary", "classes"])
def test_boundary_and_class_targets_train_and_predict(slide, client, tmp_path, kind):
    """Foreground + boundary (two sigmoid channels) from instance labels, and a class map
    from mapped label values, train and go through voxelmill predict."""
    cfg = _small_config(slide, tmp_path / "run")
    cfg["target"] = {"kind": kind}
    if kind == "classes":  # truth ids 1..5 → class 1, others → class 2, 0 stays background
        ids = np.unique(slide["truth"])
        cfg["data"]["train"][0]["labels"] = "truth"
        cfg["data"]["train"][0]["classes"] = {int(v): 1 if v <= 5 else 2 for v in ids if v}
        cfg["target"]["classes"] = ["background", "small ids", "large ids"]
    result = train(parse_config(cfg, "t", tmp_path), client)
    meta = load_checkpoint(tmp_path / "run" / "best.pt").metadata
    assert meta["arch"]["out_channels"] == (2 if kind == "boundary" else 3)
    assert meta["target"]["activation"] == ("sigmoid" if kind == "boundary" else "softmax")
    assert 0 <= result.best["val_dice"] <= 1
    res = predict(slide["path"], PredictOptions(tmp_path / "run" / "best.pt", f"t_{kind}"),
                  client, report=lambda line: None)
    probs = zarr.open_array(str(res.probabilities / "0"), mode="r")
    assert probs.shape == (meta["arch"]["out_channels"], ROWS, COLS)
    labels = zarr.open_array(str(res.labels / "0"), mode="r")[...]
    assert labels.max() <= (1 if kind == "boundary" else 2)
