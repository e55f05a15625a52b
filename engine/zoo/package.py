"""Read a bioimage.io model package (format 0.5) and build its network, safely.

A package is a local zip file, a folder, or the ``rdf.yaml`` (``bioimageio.yaml``) in a
folder; nothing is downloaded. :func:`open_package` reads and checks everything voxelmill
needs before a cluster starts: one input and one output tensor, their axes (batch, an
optional channel axis, then ``z, y, x`` or ``y, x``), the output the input's spatial size,
the tile constraints (``min`` + n·``step``, or a fixed size), the halo, the preprocessing
(one of ``zero_mean_unit_variance``, ``fixed_zero_mean_unit_variance``, ``scale_linear``,
``scale_range``, with ``ensure_dtype``), the postprocessing (``sigmoid``, ``softmax`` along
the channel axis, or none), the weight formats voxelmill runs (``pytorch_state_dict``,
``torchscript``) and every referenced file, with its sha256 when the package states one.

:func:`load_package` never runs code from the package unless ``trust_code``: an
architecture file byte-identical to the one voxelmill writes is built from voxelmill's own
:class:`engine.learn.unet.UNet`; otherwise TorchScript weights are used when present (no
Python code runs); otherwise the architecture needs ``--trust-architecture-code``. State
dicts load with ``torch.load(weights_only=True)``.

:func:`package_meta` describes the package in the metadata form of a voxelmill checkpoint
(``arch``, ``input``, ``target``, ``patch_shape``, ``divisor``, ``voxel_size``, ``unit``),
so that the inference engine runs it like a checkpoint, plus a ``zoo`` section (halo, the
smallest tile, fixed tile, the weight format chosen).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from engine.errors import InputError
from engine.learn.unet import UNet
from engine.yamlfile import parse_yaml
from engine.zoo.architecture import CALLABLE, is_voxelmill_source

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
RUNNABLE = ("pytorch_state_dict", "torchscript")
TRUST_FLAG = "--trust-architecture-code"
STAT_STEPS = ("zero_mean_unit_variance", "fixed_zero_mean_unit_variance", "scale_linear",
              "scale_range")
#: the default tile edge (voxels) when the package fixes none
DEFAULT_TILE = {2: 256, 3: 64}


def is_package(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a bioimage.io package: a ``.zip`` file, an ``rdf.yaml`` /
    ``bioimageio.yaml`` file, or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        return any((p / n).is_file() for n in RDF_NAMES)
    return p.suffix.lower() == ".zip" or p.name.endswith(RDF_NAMES)


def rdf_file(folder: str | os.PathLike[str]) -> Path:
    """The description file of a package folder (``rdf.yaml`` or ``bioimageio.yaml``)."""
    p = Path(folder)
    found = next((p / n for n in RDF_NAMES if (p / n).is_file()), None)
    if found is None:
        raise InputError(f"model package {p}: a folder without rdf.yaml")
    return found


@dataclass
class Package:
    """An opened package: its description and access to its files."""

    source: Path
    rdf: dict[str, Any]
    folder: Path | None = None  # files relative to this folder, or in the zip ``source``
    _zip_names: frozenset[str] = field(default_factory=frozenset)

    def has(self, name: str) -> bool:
        if self.folder is not None:
            return (self.folder / name).is_file()
        return name in self._zip_names

    def read(self, name: str, sha256: str | None = None) -> bytes:
        """The bytes of a file of the package, checked against ``sha256`` when given."""
        if not isinstance(name, str) or name.startswith(("http://", "https://")):
            raise InputError(f"{self.source}: {name!r} is not a file of the package "
                             "(voxelmill runs local packages only, no downloads)")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"{self.source}: file {name!r} lies outside the package")
        if not self.has(name):
            raise InputError(f"{self.source}: the package has no file {name!r} (missing)")
        if self.folder is not None:
            data = (self.folder / name).read_bytes()
        else:
            with zipfile.ZipFile(self.source) as zf:
                data = zf.read(name)
        if sha256 and hashlib.sha256(data).hexdigest() != str(sha256).lower():
            raise InputError(f"{self.source}: {name} does not match its sha256 in rdf.yaml "
                             "(changed or damaged)")
        return data


def open_package(path: str | os.PathLike[str]) -> Package:
    """Open a package and check it (see the module docstring).

    Raises
    ------
    InputError
        One line naming the package and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model package {p}: no such file or folder")
    if p.is_dir():
        pkg = Package(p, {}, folder=p)
        text = rdf_file(p).read_bytes()
    elif p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                names = frozenset(zf.namelist())
                rdf_name = next((n for n in RDF_NAMES if n in names), None)
                if rdf_name is None:
                    raise InputError(f"model package {p}: a zip without rdf.yaml")
                text = zf.read(rdf_name)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"model package {p}: not a readable zip file ({exc})") from None
        pkg = Package(p, {}, _zip_names=names)
    else:
        pkg = Package(p, {}, folder=p.parent)
        text = p.read_bytes()
    try:
        rdf = parse_yaml(text.decode("utf-8"), str(p))
    except UnicodeDecodeError:
        raise InputError(f"model package {p}: rdf.yaml is not UTF-8 text") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise InputError(f"model package {p}: rdf.yaml does not describe a model "
                         f"(type {rdf.get('type') if isinstance(rdf, dict) else None!r})")
    version = str(rdf.get("format_version", ""))
    if not version.startswith("0.5."):
        raise InputError(f"model package {p}: format_version {version!r}; voxelmill reads "
                         "0.5.x packages (update older ones with bioimageio.spec)")
    pkg.rdf = rdf
    package_meta(pkg)  # every check of the description
    return pkg


def _fail(pkg: Package, msg: str) -> InputError:
    return InputError(f"model package {pkg.source}: {msg}")


def _one(pkg: Package, key: str) -> dict[str, Any]:
    tensors = pkg.rdf.get(key)
    if not isinstance(tensors, list) or len(tensors) != 1 or not isinstance(tensors[0], dict):
        n = len(tensors) if isinstance(tensors, list) else 0
        raise _fail(pkg, f"{n} {key}; voxelmill runs models with one input and one output")
    return tensors[0]


def _axes(pkg: Package, tensor: dict[str, Any], which: str) -> tuple[dict | None, list[dict]]:
    """``(channel axis or None, space axes)``; refuses any other layout."""
    axes = tensor.get("axes")
    if not isinstance(axes, list) or not all(isinstance(a, dict) for a in axes):
        raise _fail(pkg, f"{which} {tensor.get('id')!r}: axes must be a list of axes")
    types = [a.get("type") for a in axes]
    ids = [str(a.get("id", a.get("type"))) for a in axes]
    has_c = "channel" in types
    want = ["batch", *(["channel"] if has_c else [])]
    space = [a for a in axes if a.get("type") == "space"]
    space_ids = "".join(str(a.get("id", "x")) for a in space)
    if types[:len(want)] != want or len(space) != len(axes) - len(want) \
            or space_ids not in ("yx", "zyx"):
        raise _fail(pkg, f"{which} {tensor.get('id')!r} has axes {', '.join(ids)}; voxelmill "
                    "supports batch, [channel,] then z, y, x or y, x")
    return (axes[1] if has_c else None), space


def _channel_names(axis: dict | None) -> list[str]:
    if axis is None:
        return ["channel0"]
    names = axis.get("channel_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    size = axis.get("size")
    return [f"channel{i}" for i in range(int(size) if isinstance(size, int) else 1)]


def _sizes(pkg: Package, space: list[dict]) -> tuple[list[int], list[int], bool]:
    """``(minimum, step, fixed)`` per space axis of the input."""
    mins, steps, fixed = [], [], False
    for a in space:
        size = a.get("size")
        if isinstance(size, int) and size > 0:
            mins.append(size)
            steps.append(0)
            fixed = True
        elif isinstance(size, dict) and isinstance(size.get("min"), int):
            lo, step = int(size["min"]), int(size.get("step", 0) or 0)
            if step and lo % step:
                raise _fail(pkg, f"axis {a.get('id')}: tile sizes {lo} + n·{step} are not "
                            "multiples of one divisor; voxelmill's tile grid needs min to "
                            "be a multiple of step")
            mins.append(lo)
            steps.append(step)
            fixed = fixed or not step
        else:
            raise _fail(pkg, f"input axis {a.get('id')}: size {size!r} is not supported "
                        "(a number, or min and step)")
    return mins, steps, fixed


def _per_channel(values: Any, n: int) -> list[float]:
    vals = values if isinstance(values, list) else [values] * n
    if len(vals) != n:
        raise InputError(f"{len(vals)} values for {n} channels")
    return [float(v) for v in vals]


def _normalization(pkg: Package, steps: Any, n: int, has_c: bool) -> dict[str, Any]:
    """The input's preprocessing as voxelmill normalization: ``mode`` (with percentiles),
    fixed statistics or an ``eps`` added to the computed scale."""
    out: dict[str, Any] = {"normalization": {"mode": "none", "low": 1.0, "high": 99.8},
                           "stats": [], "eps": 0.0, "fixed": False}
    found = [s for s in steps or [] if isinstance(s, dict) and s.get("id") != "ensure_dtype"]
    unknown = [str(s.get("id")) for s in found if s.get("id") not in STAT_STEPS]
    if unknown or len(found) > 1:
        raise _fail(pkg, f"preprocessing {', '.join(unknown or [str(s.get('id')) for s in found])}"
                    f" is not supported; voxelmill runs one of {', '.join(STAT_STEPS)}")
    if not found:
        return out
    step, kw = found[0]["id"], dict(found[0].get("kwargs") or {})
    try:
        if step in ("zero_mean_unit_variance", "scale_range"):
            axes = kw.get("axes")
            if axes is not None and "channel" in axes and has_c and n > 1:
                raise _fail(pkg, f"{step} over channels jointly is not supported (only "
                            "per channel, or one channel)")
            if axes is None and n > 1:
                raise _fail(pkg, f"{step} over all axes of {n} channels jointly is not "
                            "supported (only per channel, or one channel)")
            if kw.get("reference_tensor"):
                raise _fail(pkg, f"{step} with a reference_tensor is not supported")
            out["eps"] = float(kw.get("eps", 1e-6))
            out["normalization"] = (
                {"mode": "meanstd", "low": 1.0, "high": 99.8} if step.startswith("zero")
                else {"mode": "percentile", "low": float(kw.get("min_percentile", 0.0)),
                      "high": float(kw.get("max_percentile", 100.0))})
            return out
        if step == "scale_linear":
            gain = _per_channel(kw.get("gain", 1.0), n)
            offset = _per_channel(kw.get("offset", 0.0), n)
            if any(g <= 0 for g in gain):
                raise _fail(pkg, "scale_linear with a gain ≤ 0 is not supported")
            stats = {"offset": [-o / g for o, g in zip(offset, gain, strict=True)],
                     "scale": [1 / g for g in gain]}
        else:  # fixed_zero_mean_unit_variance
            eps = float(kw.get("eps", 1e-6))
            mean = _per_channel(kw.get("mean", 0.0), n)
            std = _per_channel(kw.get("std", 1.0), n)
            stats = {"offset": mean, "scale": [s + eps for s in std]}
    except (TypeError, ValueError) as exc:
        raise _fail(pkg, f"preprocessing {step}: {exc}") from None
    out.update(normalization={"mode": "fixed", "low": 1.0, "high": 99.8},
               stats=[{"name": "package", **stats}], fixed=True)
    return out


def _activation(pkg: Package, steps: Any) -> str:
    found = [s for s in steps or [] if isinstance(s, dict) and s.get("id") != "ensure_dtype"]
    if not found:
        return "none"
    if len(found) == 1 and found[0].get("id") == "sigmoid":
        return "sigmoid"
    if len(found) == 1 and found[0].get("id") == "softmax" \
            and (found[0].get("kwargs") or {}).get("axis", "channel") == "channel":
        return "softmax"
    raise _fail(pkg, f"postprocessing {', '.join(str(s.get('id')) for s in found)} is not "
                "supported; voxelmill runs sigmoid, softmax (channel) or none")


def weight_format(pkg: Package, trust_code: bool = False) -> str:
    """The weights voxelmill loads: voxelmill's own architecture, else TorchScript, else
    (trusted) a foreign architecture's state dict."""
    weights = pkg.rdf.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise _fail(pkg, "no weights")
    runnable = [w for w in RUNNABLE if isinstance(weights.get(w), dict)]
    if not runnable:
        raise _fail(pkg, f"weights {', '.join(weights)}: voxelmill runs "
                    f"{' or '.join(RUNNABLE)} weights only")
    if "pytorch_state_dict" in runnable:
        arch = weights["pytorch_state_dict"].get("architecture") or {}
        if isinstance(arch, dict) and "source" in arch and arch.get("callable") == CALLABLE:
            if is_voxelmill_source(pkg.read(arch["source"], arch.get("sha256"))):
                return "voxelmill_unet"
    if "torchscript" in runnable:
        return "torchscript"
    if not trust_code:
        raise _fail(pkg, f"its pytorch_state_dict weights need the package's own Python code "
                    f"(architecture); pass {TRUST_FLAG} to run it if you trust the package")
    return "pytorch_state_dict"


def package_meta(pkg: Package, trust_code: bool = True) -> dict[str, Any]:
    """The package in the form of a voxelmill checkpoint's metadata (see the module
    docstring). ``trust_code`` False also checks that the package loads without running
    its code."""
    inp, outp = _one(pkg, "inputs"), _one(pkg, "outputs")
    c_axis, space = _axes(pkg, inp, "input")
    k_axis, out_space = _axes(pkg, outp, "output")
    dims = len(space)
    if len(out_space) != dims:
        raise _fail(pkg, "the output has other spatial axes than the input")
    halo = []
    for a, b in zip(space, out_space, strict=True):
        size = b.get("size")
        ok = (isinstance(size, dict) and size.get("axis_id", a.get("id")) == a.get("id")
              and not size.get("offset", 0)) or (isinstance(size, int)
                                                  and size == a.get("size"))
        scale_ok = math.isclose(float(a.get("scale", 1.0)), float(b.get("scale", 1.0)))
        if not ok or not scale_ok:
            raise _fail(pkg, f"output axis {b.get('id')} is not the input's size; voxelmill "
                        "runs models whose output has the input's spatial shape")
        halo.append(int(b.get("halo", 0) or 0))
    mins, steps, fixed = _sizes(pkg, space)
    divisor = [s or m for m, s in zip(mins, steps, strict=True)]
    default = DEFAULT_TILE[dims]
    patch = [m if not s else m + s * max(0, math.ceil((max(default, m + 2 * h) - m) / s))
             for m, s, h in zip(mins, steps, halo, strict=True)]
    names = _channel_names(c_axis)
    units = {a.get("unit") for a in space}
    unit = units.pop() if len(units) == 1 and None not in units else None
    activation = _activation(pkg, outp.get("postprocessing"))
    classes = _channel_names(k_axis) if k_axis is not None else ["foreground"]
    norm = _normalization(pkg, inp.get("preprocessing"), len(names), c_axis is not None)
    fmt = weight_format(pkg, trust_code)
    return {
        "arch": {"name": "bioimageio", "spatial_dims": dims, "in_channels": len(names),
                 "out_channels": len(classes)},
        "input": {"channels": names, **norm},
        "target": {"kind": "classes" if activation == "softmax" else "binary",
                   "classes": classes, "activation": activation},
        "patch_shape": patch, "divisor": divisor,
        "voxel_size": [float(a.get("scale", 1.0)) for a in space] if unit else None,
        "unit": unit or "",
        "zoo": {"name": pkg.rdf.get("name"), "halo": halo, "min_shape": mins,
                "fixed_shape": mins if fixed else None, "weights": fmt,
                "has_channel_axis": c_axis is not None,
                "output_has_channel_axis": k_axis is not None,
                "format_version": str(pkg.rdf.get("format_version")),
                "authors": [a.get("name") for a in pkg.rdf.get("authors", [])
                            if isinstance(a, dict)]},
    }


class _Layout(torch.nn.Module):
    """Adds or removes the channel axis around a network whose tensors lack one, so the
    engine always passes ``(B, C, *spatial)`` and gets ``(B, K, *spatial)``."""

    def __init__(self, net: Any, in_channel: bool, out_channel: bool) -> None:
        super().__init__()
        self.net, self.in_channel, self.out_channel = net, in_channel, out_channel

    def forward(self, x: Any) -> Any:
        y = self.net(x if self.in_channel else x[:, 0])
        return y if self.out_channel else y[:, None]


def _import_architecture(pkg: Package, arch: dict[str, Any]) -> Any:
    """The callable of a foreign architecture (trusted): the package's source file, or a
    library module."""
    if "source" in arch:
        code = pkg.read(arch["source"], arch.get("sha256"))
        with tempfile.TemporaryDirectory(prefix="voxelmill-arch-") as tmp:
            file = Path(tmp) / "architecture.py"
            file.write_bytes(code)
            name = f"voxelmill_package_arch_{hashlib.sha256(code).hexdigest()[:16]}"
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except ImportError as exc:
                raise _fail(pkg, f"its architecture {arch['source']} needs the module "
                            f"{exc.name or exc}, which is not installed") from None
            sys.modules.setdefault(name, module)
    else:
        try:
            module = importlib.import_module(str(arch.get("import_from")))
        except ImportError as exc:
            raise _fail(pkg, f"its architecture needs the module {arch.get('import_from')!r}"
                        f", which is not installed ({exc.name or exc})") from None
    fn = getattr(module, str(arch.get("callable")), None)
    if fn is None:
        raise _fail(pkg, f"its architecture has no callable {arch.get('callable')!r}")
    return fn


def load_package(path: str | os.PathLike[str], device: Any = "cpu", trust_code: bool = False
                 ) -> tuple[Any, dict[str, Any]]:
    """The package's network (in eval mode, on ``device``, taking and giving channel
    axes) and its metadata (:func:`package_meta`).

    Raises
    ------
    InputError
        For any problem of the package, or (without ``trust_code``) when it could only run
        by executing the package's own code.
    """
    pkg = open_package(path)
    meta = package_meta(pkg, trust_code)
    weights = pkg.rdf["weights"]
    fmt = meta["zoo"]["weights"]
    if fmt == "torchscript":
        w = weights["torchscript"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(io.BytesIO(pkg.read(w.get("source"), w.get("sha256"))),
                                     map_location=device)
        except InputError:
            raise
        except Exception as exc:  # torch raises RuntimeError for foreign archives
            raise _fail(pkg, f"{w.get('source')} is not loadable TorchScript ({exc})") from None
    else:
        w = weights["pytorch_state_dict"]
        arch = w.get("architecture") or {}
        kwargs = arch.get("kwargs") or {}
        build = UNet if fmt == "voxelmill_unet" else _import_architecture(pkg, arch)
        try:
            net = build(**kwargs)
        except Exception as exc:  # the architecture's own argument checks
            raise _fail(pkg, f"its architecture does not take kwargs {kwargs} ({exc})") from None
        data = pkg.read(w.get("source"), w.get("sha256"))
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refusals and junk files
            raise _fail(pkg, f"{w.get('source')} does not load with weights_only=True "
                        f"({str(exc).splitlines()[0][:200]})") from None
        if isinstance(state, Mapping) and "state_dict" in state and \
                isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        try:
            net.load_state_dict(state)
        except Exception as exc:
            raise _fail(pkg, f"the weights do not fit the architecture "
                        f"({str(exc).splitlines()[0][:200]})") from None
    model = _Layout(net, meta["zoo"]["has_channel_axis"], meta["zoo"]["output_has_channel_axis"])
    return model.to(device).eval(), meta


def describe_package(meta: Mapping[str, Any]) -> list[str]:
    """Human-readable lines about a package, for ``voxelmill model info``."""
    zoo, inp, target = meta["zoo"], meta["input"], meta["target"]
    norm = inp["normalization"]["mode"]
    return [
        f"package    {zoo.get('name')} (bioimage.io format {zoo['format_version']}), "
        f"authors {', '.join(map(str, zoo.get('authors') or [])) or '?'}",
        f"weights    {zoo['weights']}" + {
            "pytorch_state_dict": f" (runs the package's own code: needs {TRUST_FLAG})",
            "voxelmill_unet": " (state dict of voxelmill's own U-Net, built from its code)",
            "torchscript": " (no Python code of the package runs)"}.get(zoo["weights"], ""),
        f"input      {', '.join(inp['channels'])}; normalization "
        + ("with fixed statistics" if inp.get("fixed") else
           "none" if norm == "none" else f"{norm} of the whole volume"),
        f"output     {target['kind']} ({target['activation']}): {', '.join(target['classes'])}",
        f"tiles      min {zoo['min_shape']}, step {meta['divisor']}"
        + (" (fixed)" if zoo.get("fixed_shape") else "") + f", halo {zoo['halo']}; "
        f"default tile {meta['patch_shape']}",
        f"voxel size {meta.get('voxel_size')} {meta.get('unit', '')}",
    ]
