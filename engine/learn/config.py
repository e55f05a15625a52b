"""The training configuration: one YAML file, every field also settable from the command line.

A complete file (every key but ``data.train`` has a default)::

    output: runs/nuclei            # folder for best.pt, last.pt, metrics.json, curves.png
    data:
      train:                       # sources, mixable (see engine.learn.data)
        - {path: slide.ome.zarr, labels: nuclei, channels: [brightfield]}
        - {path: patches/, kind: patches}
      val: []                      # explicit validation sources (default: held out of train)
      val_fraction: 0.2            # held out by source volume, or as a slab of a single volume
      val_axis: null               # the slab's axis (z, y, x or an index); null: chosen
      allow_empty_validation: false  # true: validation labels without foreground are
                                   # accepted, best.pt is then chosen by validation loss
      patch_shape: [128, 128]      # (Y, X) or (Z, Y, X) voxels; divisible as the model needs
      foreground_fraction: 0.5     # share of crops centred on a foreground voxel
      val_crops: 64                # deprecated, ignored: validation predicts its whole region
      normalization: {mode: percentile, low: 1.0, high: 99.8}   # global, per source volume
      memory_mib: 512              # sources loaded whole while they fit; larger ones streamed
      workers: auto                # crop loader threads (auto: from the cores; 0: in the loop)
    target:
      kind: binary                 # binary | classes | boundary (foreground + boundary)
      classes: [background, foreground]     # names; for kind classes, one per output channel
      boundary_width: 1
    model:
      features: [16, 32, 64, 128]  # channels per level; len - 1 poolings
      norm: instance               # instance | batch | group | none
      anisotropic_levels: 0        # 3D: leading in-plane-only poolings
      up_mode: transpose
    loss:
      dice_weight: 1.0
      pos_weight: null             # null | auto (MISIC: from the foreground fraction) | number
      class_weights: null          # classes targets: null | auto (inverse class frequency,
                                   # mean 1) | [w0, w1, ...] one positive number per class
    augment: {flip: {p: 0.5}, rot90: {p: 0.5}, noise: {p: 0.3, sigma: [0.0, 0.2]}}
    train:
      iterations: 2000
      batch_size: 4
      optimizer: adamw             # adam | adamw
      lr: 0.001
      weight_decay: 0.0001
      schedule: cosine             # cosine | constant | step
      warmup: 0                    # iterations of linear warm-up
      val_every: 100
      patience: 0                  # validations without improvement before stopping; 0 = never
      seed: 0
      device: auto                 # auto | cpu | cuda | cuda:1 ...
      amp: true                    # mixed precision (CUDA only): true (bf16 where the GPU
                                   # has it, else fp16 with a grad scaler) | bf16 | fp16 | false
      compile: false               # torch.compile the model
      channels_last: false         # channels-last memory layout (CUDA convolutions)
      augment_on: auto             # auto (the device when it is CUDA) | cpu | device
      init: null                   # a checkpoint to fine-tune from
      prefetch: 4                  # batches prepared ahead by the crop loader
      stop_at: null                # stop (resumable) after this iteration; the schedule
                                   # still spans train.iterations (training in slices)

Validation (``data.val*``) predicts every voxel of its regions with the tiled, blended
predictor of ``voxelmill predict`` (:mod:`engine.learn.validation`); a single source volume
gives up a slab chosen to hold foreground in proportion (:mod:`engine.learn.split`).
``data.val_crops`` is still accepted so that older files run, but it no longer does anything.

Checking the configuration is complete before anything runs: an unknown key, a value of
the wrong type or out of range, each gives one line naming ``config.yaml: train.lr``; all
are reported at once. :func:`apply_overrides` sets dotted keys (``train.lr=0.0005``)
before validation.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InputError, OptionError
from engine.learn.augment import Augment
from engine.learn.data import SourceSpec, parse_sources
from engine.learn.normalize import Normalization
from engine.learn.unet import NORMS, UP_MODES
from engine.yamlfile import parse_yaml, read_yaml

TARGET_KINDS = ("binary", "classes", "boundary")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant", "step")
POS_WEIGHT_MODES = ("auto",)
CLASS_WEIGHT_MODES = ("auto",)
AMP_MODES = (True, False, "bf16", "fp16")
AUGMENT_ON = ("auto", "cpu", "device")


@dataclass(frozen=True)
class DataConfig:
    train: tuple[SourceSpec, ...]
    val: tuple[SourceSpec, ...] = ()
    val_fraction: float = 0.2
    patch_shape: tuple[int, ...] = (128, 128)
    foreground_fraction: float = 0.5
    val_crops: int = 64  # deprecated: accepted, ignored (validation predicts whole regions)
    normalization: Normalization = field(default_factory=Normalization)
    memory_mib: float = 512.0
    workers: int | str = "auto"
    val_axis: int | None = None
    allow_empty_validation: bool = False


@dataclass(frozen=True)
class TargetConfig:
    kind: str = "binary"
    classes: tuple[str, ...] = ("background", "foreground")
    boundary_width: int = 1


@dataclass(frozen=True)
class ModelConfig:
    features: tuple[int, ...] = (16, 32, 64, 128)
    norm: str | None = "instance"
    anisotropic_levels: int = 0
    up_mode: str = "transpose"


@dataclass(frozen=True)
class LossConfig:
    dice_weight: float = 1.0
    pos_weight: str | float | None = None
    class_weights: str | tuple[float, ...] | None = None
    """Classes targets: ``None``, ``"auto"`` (per batch, inverse class frequency of the
    valid voxels, mean 1) or one positive factor per class on its cross-entropy terms
    (see :func:`engine.learn.losses.masked_ce_dice`)."""


@dataclass(frozen=True)
class LoopConfig:
    iterations: int = 2000
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup: int = 0
    val_every: int = 100
    patience: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool | str = True
    compile: bool = False
    channels_last: bool = False
    augment_on: str = "auto"
    init: Path | None = None
    prefetch: int = 4
    stop_at: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """A validated training configuration (see the module docstring for the fields)."""

    output: Path
    data: DataConfig
    target: TargetConfig = field(default_factory=TargetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: dict[str, Any] = field(default_factory=dict)
    train: LoopConfig = field(default_factory=LoopConfig)

    @property
    def out_channels(self) -> int:
        """Logit channels: 1 (binary), 2 (foreground, boundary) or one per class."""
        return {"binary": 1, "boundary": 2}.get(self.target.kind, len(self.target.classes))

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-serialisable form; :func:`parse_config` of it gives an equal config."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if isinstance(value, SourceSpec):
        out = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(value, Normalization):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, int) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- checking


class _Checker:
    """Collects one line per problem, all reported together."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}: {message}")

    def section(self, raw: Any, where: str, cls: type) -> dict[str, Any]:
        """The mapping at ``where`` with unknown keys reported (close matches suggested)."""
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.add(where, f"expected a mapping, got {type(raw).__name__}")
            return {}
        known = [f.name for f in dataclasses.fields(cls)]
        out = {}
        for key, value in raw.items():
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(known)}"
                self.add(f"{where}.{key}" if where else str(key), f"unknown key{hint}")
            else:
                out[key] = value
        return out

    def number(self, d: dict, key: str, where: str, default: float, *, integer: bool = False,
               low: float | None = None, high: float | None = None, low_open: bool = False
               ) -> Any:
        if key not in d:
            return default
        v = d[key]
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, int | float) or (
                integer and not float(v).is_integer()) or not math.isfinite(float(v)):
            self.add(f"{where}.{key}", f"expected {kind}, got {v!r}")
            return default
        v = int(v) if integer else float(v)
        if low is not None and (v <= low if low_open else v < low):
            self.add(f"{where}.{key}", f"must be {'>' if low_open else '≥'} {low}, got {v}")
        elif high is not None and v > high:
            self.add(f"{where}.{key}", f"must be ≤ {high}, got {v}")
        return v

    def choice(self, d: dict, key: str, where: str, default: Any, choices: Sequence[Any]) -> Any:
        if key not in d:
            return default
        if d[key] not in choices:
            self.add(f"{where}.{key}", f"expected one of {', '.join(map(str, choices))}, "
                     f"got {d[key]!r}")
            return default
        return d[key]

    def ints(self, d: dict, key: str, where: str, default: tuple[int, ...], low: int = 1
             ) -> tuple[int, ...]:
        if key not in d:
            return default
        v = d[key]
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list | tuple) or not v or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v):
            self.add(f"{where}.{key}", f"expected a list of integers ≥ {low}, got {v!r}")
            return default
        return tuple(v)

    def raise_if_any(self) -> None:
        if self.problems:
            raise InputError("\n".join(self.problems))


def _sources(c: _Checker, raw: Any, where: str, base: Path, required: bool
             ) -> tuple[SourceSpec, ...]:
    if raw is None or raw == []:
        if required:
            c.add(where, "at least one training source is needed (a list of paths or "
                  "mappings with a path)")
        return ()
    if not isinstance(raw, list):
        raw = [raw]
    entries = []
    for entry in raw:  # relative paths are relative to the config file
        if isinstance(entry, str):
            entry = {"path": entry}
        if isinstance(entry, Mapping) and isinstance(entry.get("path"), str):
            entry = {**entry, "path": str(base / Path(entry["path"]).expanduser())}
        entries.append(entry)
    try:
        return tuple(parse_sources(entries, where))
    except (InputError, OptionError) as exc:
        c.problems.append(f"{c.source}: {exc}")
        return ()


def _flag(c: _Checker, d: dict, key: str, where: str, default: bool) -> bool:
    """A true/false setting."""
    v = d.get(key, default)
    if not isinstance(v, bool):
        c.add(f"{where}.{key}", f"expected true or false, got {v!r}")
        return default
    return v


def _val_axis(c: _Checker, raw: Any, dims: int) -> int | None:
    """``data.val_axis``: null, an axis name (z, y, x; y and x in 2D) or a spatial index."""
    if raw is None:
        return None
    names = "zyx"[3 - dims:] if dims in (2, 3) else "zyx"
    if isinstance(raw, str) and raw.lower() in names:
        return names.index(raw.lower())
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(names):
        return raw
    c.add("data.val_axis", f"expected null, one of {', '.join(names)} or an index below "
          f"{len(names)}, got {raw!r}")
    return None


def _class_weights(c: _Checker, raw: Any, kind: str, classes: tuple[str, ...]
                   ) -> str | tuple[float, ...] | None:
    """``loss.class_weights``: null, auto, or one positive number per class."""
    if raw is None:
        return None
    where = "loss.class_weights"
    if kind != "classes":
        c.add(where, f"applies to classes targets only (the target is {kind}; use "
              "loss.pos_weight)")
        return None
    if raw in CLASS_WEIGHT_MODES:
        return str(raw)
    if not isinstance(raw, list | tuple) or not raw or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and v > 0 for v in raw):
        c.add(where, f"expected null, auto or a list of positive numbers (one per class), "
              f"got {raw!r}")
        return None
    if len(raw) != len(classes):
        c.add(where, f"expected {len(classes)} weights, one per class "
              f"({', '.join(classes)}), got {len(raw)}: {list(raw)!r}")
        return None
    return tuple(float(v) for v in raw)


def parse_config(raw: Any, source: str = "config", base: Path | None = None) -> TrainConfig:
    """Validate a configuration mapping.

    Parameters
    ----------
    raw : mapping
        As read from YAML (after :func:`apply_overrides`).
    source : str
        Names the configuration in messages (the file path).
    base : Path, optional
        Folder that relative paths are relative to (the config file's folder; default the
        current directory).

    Raises
    ------
    InputError
        Listing every problem, one per line.
    """
    base = base or Path.cwd()
    c = _Checker(source)
    top = c.section(raw if raw is not None else {}, "", TrainConfig)
    if raw is not None and not isinstance(raw, Mapping):
        c.raise_if_any()

    output = top.get("output")
    if output is None:
        c.add("output", "missing: the folder to write checkpoints and metrics into")
        output = "."
    elif not isinstance(output, str) or not output.strip():
        c.add("output", f"expected a folder path, got {output!r}")
        output = "."
    output_path = base / Path(output).expanduser()

    d = c.section(top.get("data"), "data", DataConfig)
    train_src = _sources(c, d.get("train"), "data.train", base, required=True)
    val_src = _sources(c, d.get("val"), "data.val", base, required=False)
    patch = c.ints(d, "patch_shape", "data", DataConfig.patch_shape)
    if len(patch) not in (2, 3):
        c.add("data.patch_shape", f"expected 2 (Y, X) or 3 (Z, Y, X) sizes, got {list(patch)}")
    norm = Normalization()
    if "normalization" in d:
        try:
            raw_norm = d["normalization"]
            if isinstance(raw_norm, str):
                raw_norm = {"mode": raw_norm}
            norm = Normalization.from_dict(raw_norm)
        except (OptionError, InputError, TypeError) as exc:
            c.add("data.normalization", str(exc))
    data = DataConfig(
        train=train_src, val=val_src,
        val_fraction=c.number(d, "val_fraction", "data", 0.2, low=0.0, high=0.9),
        patch_shape=patch,
        foreground_fraction=c.number(d, "foreground_fraction", "data", 0.5, low=0.0, high=1.0),
        val_crops=c.number(d, "val_crops", "data", 64, integer=True, low=1),
        normalization=norm,
        memory_mib=c.number(d, "memory_mib", "data", 512.0, low=0.0),
        workers="auto" if d.get("workers", "auto") == "auto" else c.number(
            d, "workers", "data", "auto", integer=True, low=0, high=256),
        val_axis=_val_axis(c, d.get("val_axis"), len(patch)),
        allow_empty_validation=_flag(c, d, "allow_empty_validation", "data", False),
    )

    t = c.section(top.get("target"), "target", TargetConfig)
    kind = c.choice(t, "kind", "target", "binary", TARGET_KINDS)
    classes = TargetConfig.classes
    if "classes" in t:
        v = t["classes"]
        if isinstance(v, int) and not isinstance(v, bool) and v >= 2:
            v = [f"class {i}" for i in range(v)]
        if not isinstance(v, list) or len(v) < 2 or not all(isinstance(x, str) for x in v) \
                or len(set(v)) != len(v):
            c.add("target.classes", f"expected a list of at least 2 distinct class names "
                  f"(or their number), got {v!r}")
        else:
            classes = tuple(v)
    if kind != "classes" and len(classes) != 2:
        c.add("target.classes", f"a {kind} target has 2 classes (background, foreground), "
              f"got {len(classes)}; use kind: classes for more")
    target = TargetConfig(kind, classes, c.number(t, "boundary_width", "target", 1,
                                                  integer=True, low=1, high=16))

    m = c.section(top.get("model"), "model", ModelConfig)
    norm_layer = m.get("norm", "instance")
    if norm_layer in ("none", "None"):
        norm_layer = None
    if norm_layer is not None and norm_layer not in NORMS:
        c.add("model.norm", f"expected one of {', '.join(NORMS)} or none, got {norm_layer!r}")
        norm_layer = "instance"
    features = c.ints(m, "features", "model", ModelConfig.features)
    model = ModelConfig(
        features=features, norm=norm_layer,
        anisotropic_levels=c.number(m, "anisotropic_levels", "model", 0, integer=True, low=0,
                                    high=max(len(features) - 1, 0)),
        up_mode=c.choice(m, "up_mode", "model", "transpose", UP_MODES),
    )

    lo = c.section(top.get("loss"), "loss", LossConfig)
    pos_weight: str | float | None = lo.get("pos_weight")
    if pos_weight is not None and pos_weight not in POS_WEIGHT_MODES:
        if isinstance(pos_weight, bool) or not isinstance(pos_weight, int | float) \
                or not pos_weight > 0:
            c.add("loss.pos_weight", f"expected null, auto or a positive number, got "
                  f"{pos_weight!r}")
            pos_weight = None
        else:
            pos_weight = float(pos_weight)
    if pos_weight is not None and kind == "classes":
        c.add("loss.pos_weight", "applies to binary and boundary targets only")
    class_weights = _class_weights(c, lo.get("class_weights"), kind, classes)
    loss = LossConfig(c.number(lo, "dice_weight", "loss", 1.0, low=0.0), pos_weight,
                      class_weights)

    augment = top.get("augment") or {}
    try:
        augment = Augment(augment).to_config()
    except (OptionError, InputError) as exc:
        c.add("augment", str(exc))
        augment = {}

    r = c.section(top.get("train"), "train", LoopConfig)
    device = r.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda")
                                           or device.startswith("cuda:")):
        c.add("train.device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
        device = "auto"
    amp = r.get("amp", True)
    if not any(amp is m if isinstance(m, bool) else amp == m for m in AMP_MODES):
        c.add("train.amp", f"expected true, false, bf16 or fp16, got {amp!r}")
        amp = True
    flags = {key: _flag(c, r, key, "train", False) for key in ("compile", "channels_last")}
    init = r.get("init")
    init_path = None
    if init is not None:
        if not isinstance(init, str):
            c.add("train.init", f"expected a checkpoint path, got {init!r}")
        else:
            init_path = base / Path(init).expanduser()
            if not init_path.is_file():
                c.add("train.init", f"{init_path}: no such checkpoint file")
    loop = LoopConfig(
        iterations=c.number(r, "iterations", "train", 2000, integer=True, low=1),
        batch_size=c.number(r, "batch_size", "train", 4, integer=True, low=1),
        optimizer=c.choice(r, "optimizer", "train", "adamw", OPTIMIZERS),
        lr=c.number(r, "lr", "train", 1e-3, low=0.0, low_open=True),
        weight_decay=c.number(r, "weight_decay", "train", 1e-4, low=0.0),
        schedule=c.choice(r, "schedule", "train", "cosine", SCHEDULES),
        warmup=c.number(r, "warmup", "train", 0, integer=True, low=0),
        val_every=c.number(r, "val_every", "train", 100, integer=True, low=1),
        patience=c.number(r, "patience", "train", 0, integer=True, low=0),
        seed=c.number(r, "seed", "train", 0, integer=True, low=0),
        device=device, amp=amp, init=init_path, **flags,
        augment_on=c.choice(r, "augment_on", "train", "auto", AUGMENT_ON),
        prefetch=c.number(r, "prefetch", "train", 4, integer=True, low=1, high=64),
        stop_at=None if r.get("stop_at") is None else c.number(
            r, "stop_at", "train", None, integer=True, low=1),
    )
    c.raise_if_any()
    return TrainConfig(output_path, data, target, model, loss, augment, loop)


def apply_overrides(raw: Any, overrides: Sequence[str], source: str = "--set") -> dict:
    """Set dotted keys in a copy of ``raw``: ``["train.lr=5e-4", "data.patch_shape=[64,64]"]``.

    Values are parsed as YAML (numbers, lists, ``null``, strings). A list index is not
    addressable; give the whole list instead.
    """
    out = copy.deepcopy(dict(raw)) if isinstance(raw, Mapping) else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise OptionError(f"{source} {item!r}: expected KEY=VALUE with a dotted key, "
                              "e.g. train.lr=0.0005")
        value = parse_yaml(text, f"{source} {item!r}")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise OptionError(f"{source} {item!r}: {part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override and validate a configuration file (``None``: flags only)."""
    if path is None:
        raw: Any = {}
        source, base = "training options", Path.cwd()
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such configuration file")
        raw = read_yaml(p, str(p), "training configuration")
        source, base = str(p), p.resolve().parent
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise InputError(f"{p}: expected a mapping of sections (data, model, train ...), "
                             f"got {type(raw).__name__}")
    return parse_config(apply_overrides(raw, overrides), source, base)
