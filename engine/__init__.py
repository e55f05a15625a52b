"""voxelmill engine: all logic behind the ``voxelmill`` command line.

The data flows one way: ``io`` (readers, writers) → ``blocks`` (the grid) →
``runner`` (distributed execution) → pipelines (``convert``, ``export``, ``demo``).
"""

from engine.errors import VoxelmillError
from engine.volume import Volume

__all__ = ["Volume", "VoxelmillError"]
__version__ = "0.1.0"
