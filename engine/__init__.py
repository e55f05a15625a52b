"""voxelmill engine: all logic behind the ``voxelmill`` command line.

Its layers import only downward (``tests/test_layers.py`` holds the table):
``pipelines`` (whole commands) → the feature packages, each importing only those before
it (``segment``, ``patches``, ``curate``, ``dataset``, ``learn``, ``predict``,
``instances``, ``cutter``, ``report``) → core (``runner``, ``blocks``, ``io``, ``output`` …)
→ base (``errors``, ``events`` and this package's version).
"""

from engine.errors import VoxelmillError
from engine.startup import import_dask_array_without_xarray

# before any module of the engine imports dask.array: in the command's process and in every
# worker, which imports the engine to unpickle its tasks (see engine.startup)
import_dask_array_without_xarray()

__all__ = ["VoxelmillError"]
__version__ = "0.1.0"
