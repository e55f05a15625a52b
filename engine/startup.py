"""What every voxelmill process pays to start: ``dask.array`` without xarray.

``dask.array`` imports xarray whenever it is installed (and xarray imports pandas), only to
recognise a chunked ``xarray.DataArray`` handed to ``da.asarray``. voxelmill never hands it
one, but every process that touches an array would pay for it: about 0.25 s of import and
40 MiB of resident memory in the command's process and again in each worker, and the tests
start hundreds of both. xarray gets installed beside voxelmill by ``bioimageio.core``.

:func:`import_dask_array_without_xarray` arranges that the first import of ``dask.array``
in this process finds no xarray, unless xarray was imported before (then nothing changes).
Importing xarray afterwards works as usual; only ``da.asarray`` of a chunked DataArray then
computes it instead of taking its dask array. dask 2026.11.0 no longer imports xarray with
``dask.array`` (it looks xarray up among the modules already imported when asked): there
the finder changes nothing.
"""

from __future__ import annotations

import importlib.machinery
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

_TARGET = "dask.array"


class _DaskArrayWithoutXarray:
    """A ``sys.meta_path`` finder (not derived from ``importlib.abc.MetaPathFinder``, whose
    import costs more than this whole module saves on a ``--help``): finds ``dask.array`` as
    the path finder does and runs its package ``__init__`` (which imports
    ``dask.array.core``) while ``import xarray`` fails. Removes itself once used."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        _remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or "xarray" in sys.modules:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_without_xarray(module: ModuleType) -> None:
            sys.modules["xarray"] = None  # type: ignore[assignment]  # import raises
            try:
                exec_module(module)
            finally:
                if "xarray" in sys.modules and sys.modules["xarray"] is None:
                    del sys.modules["xarray"]

        loader.exec_module = exec_without_xarray  # type: ignore[method-assign]
        return spec


def _remove(finder: object) -> None:
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


def import_dask_array_without_xarray() -> None:
    """Make this process's first ``import dask.array`` skip dask's optional xarray import.

    Cheap and idempotent: installs a finder that acts on that one import and then removes
    itself; does nothing when ``dask.array`` or xarray is already imported.
    """
    if _TARGET in sys.modules or "xarray" in sys.modules:
        return
    if any(isinstance(f, _DaskArrayWithoutXarray) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DaskArrayWithoutXarray())
