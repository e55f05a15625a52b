"""The self-contained architecture source file that voxelmill puts in a model package.

The bioimage.io format needs the network's Python source for PyTorch state-dict weights,
in one file that imports nothing but torch and the standard library. voxelmill writes
``engine/learn/unet.py`` with its one import from ``engine`` replaced by a local exception
class. When a package's architecture file is byte-identical to what this voxelmill writes,
voxelmill builds the network from its own :class:`engine.learn.unet.UNet` and runs nothing
from the package (:func:`is_voxelmill_source`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import engine.learn.unet as unet_module

FILE_NAME = "voxelmill_unet.py"
CALLABLE = "UNet"
_IMPORT = "from engine.errors import OptionError\n"
_LOCAL = ('class OptionError(ValueError):\n'
          '    """An argument or input that does not fit the model."""\n')
_HEADER = ('# The U-Net of voxelmill (https://github.com/voxelmill), self-contained: it needs\n'
           '# only torch. Written by voxelmill model export --format bioimageio.\n')


def architecture_source() -> bytes:
    """The architecture file's bytes (UTF-8 Python source, needs only torch)."""
    text = Path(unet_module.__file__).read_text(encoding="utf-8")
    if _IMPORT not in text:  # the replacement below must keep the file self-contained
        raise RuntimeError(f"{unet_module.__file__}: expected the line {_IMPORT.strip()!r}")
    return (_HEADER + text.replace(_IMPORT, _LOCAL, 1)).encode("utf-8")


def is_voxelmill_source(data: bytes) -> bool:
    """Whether ``data`` is byte for byte the architecture file this voxelmill writes."""
    return hashlib.sha256(data).digest() == hashlib.sha256(architecture_source()).digest()
