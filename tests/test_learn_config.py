"""The training configuration: defaults, complete validation, overrides, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.errors import InputError, OptionError
from engine.learn.config import apply_overrides, load_config, parse_config


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    # any existing path will do for validation: sources are opened by the planner
    p = tmp_path / "vol.ome.zarr"
    p.mkdir()
    return p


def test_defaults_and_relative_paths(tmp_path: Path, source: Path) -> None:
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({"output": "runs/a", "data": {"train": ["vol.ome.zarr"]}}))
    cfg = load_config(cfg_file)
    assert cfg.output == tmp_path / "runs" / "a"
    assert cfg.data.train[0].path == source
    assert cfg.target.kind == "binary" and cfg.out_channels == 1
    assert cfg.train.iterations == 2000 and cfg.train.optimizer == "adamw"
    assert cfg.data.normalization.mode == "percentile"


def test_every_problem_reported_at_once(tmp_path: Path, source: Path) -> None:
    raw = {"output": "o", "data": {"train": [str(source)], "patch_shape": [64, 64, 64, 64],
                                   "val_fraction": 2},
           "model": {"norm": "layer", "featurs": [8]},
           "train": {"lr": -1, "iterations": 1.5, "device": "tpu", "optimiser": "sgd"},
           "loss": {"pos_weight": "always"}, "augment": {"flip": {"p": 3}}, "extra": 1}
    with pytest.raises(InputError) as exc:
        parse_config(raw, "cfg.yaml", tmp_path)
    lines = str(exc.value).splitlines()
    text = str(exc.value)
    for needle in ("data.patch_shape", "data.val_fraction", "model.norm",
                   "model.featurs: unknown key (did you mean 'features'?)", "train.lr",
                   "train.iterations", "train.device", "train.optimiser", "loss.pos_weight",
                   "augment", "extra: unknown key"):
        assert needle in text, needle
    assert all(line.startswith("cfg.yaml: ") for line in lines)
    assert len(lines) >= 11


def test_missing_sources_and_output(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="output: missing") as exc:
        parse_config({"data": {}}, "c.yaml", tmp_path)
    assert "data.train: at least one training source" in str(exc.value)


def test_classes_target(tmp_path: Path, source: Path) -> None:
    cfg = parse_config({"output": "o", "data": {"train": [str(source)]},
                        "target": {"kind": "classes", "classes": ["bg", "cell", "debris"]}},
                       "c", tmp_path)
    assert cfg.out_channels == 3
    assert parse_config({"output": "o", "data": {"train": [str(source)]},
                         "target": {"kind": "boundary"}}, "c", tmp_path).out_channels == 2
    with pytest.raises(InputError, match="a binary target has 2 classes"):
        parse_config({"output": "o", "data": {"train": [str(source)]},
                      "target": {"classes": 3}}, "c", tmp_path)


def test_overrides_set_dotted_keys_as_yaml_values() -> None:
    raw = {"train": {"lr": 0.1}}
    got = apply_overrides(raw, ["train.lr=5e-4", "data.patch_shape=[64, 64]", "train.init=null",
                                "target.kind=classes"])
    assert got == {"train": {"lr": 5e-4, "init": None},
                   "data": {"patch_shape": [64, 64]}, "target": {"kind": "classes"}}
    assert raw == {"train": {"lr": 0.1}}  # the caller's mapping is left alone
    with pytest.raises(OptionError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(OptionError, match="lr is not a section"):
        apply_overrides(raw, ["train.lr.x=1"])


def test_round_trip(tmp_path: Path, source: Path) -> None:
    cfg = parse_config({"output": str(tmp_path / "o"),
                        "data": {"train": [{"path": str(source), "labels": "cells",
                                            "channels": ["DAPI"]}],
                                 "normalization": {"mode": "meanstd"}},
                        "augment": {"noise": {"p": 0.5}}, "train": {"iterations": 7}},
                       "c", tmp_path)
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), "c", Path("/"))
    assert again == cfg


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(InputError, match="bad.yaml: YAML syntax error at line"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_config(bad)
