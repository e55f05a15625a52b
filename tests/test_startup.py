"""What a voxelmill process imports to start. Every command (and every test that runs one)
starts a Python process for the command and one per worker, so their imports are paid many
times: the command line loads no science library before a command runs, and ``dask.array``
comes without xarray and pandas (``engine.startup``). Each case runs in a fresh interpreter,
the only place where ``sys.modules`` says what an import pulls in."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["dask", "distributed", "numpy", "scipy", "skimage", "zarr", "torch", "xarray",
         "pandas", "bokeh", "matplotlib", "tifffile", "h5py", "pydantic"]


def _loaded(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last line must print a JSON value."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_command_line_loads_no_science_library_before_a_command_runs():
    loaded = _loaded(f"import json, sys, cli.main; print(json.dumps([m for m in {HEAVY!r} "
                     "if m in sys.modules]))")
    assert loaded == []


def test_dask_array_comes_without_xarray_and_xarray_still_imports_afterwards():
    got = _loaded(
        "import json, sys\n"
        "import engine.volume, dask.array as da\n"
        "before = {m: m in sys.modules for m in ('dask.array', 'xarray', 'pandas')}\n"
        "import numpy as np, xarray as xr\n"
        "a = xr.DataArray(np.arange(6).reshape(2, 3), dims=('y', 'x'))\n"
        # older dask binds xarray as dask.array.core.xr when dask.array is imported; 2026.11.0
        # looks it up in sys.modules when asked
        "print(json.dumps({'before': before, 'xr': getattr(da.core, 'xr', None) is None,\n"
        "                  'sum': int(da.from_array(a.values).sum().compute()),\n"
        "                  'finders': [type(f).__name__ for f in sys.meta_path]}))")
    assert got["before"] == {"dask.array": True, "xarray": False, "pandas": False}
    assert got["xr"] is True and got["sum"] == 15
    assert "_DaskArrayWithoutXarray" not in got["finders"]  # removed once used


def test_xarray_imported_first_is_left_to_dask_as_it_is():
    got = _loaded("import json, xarray, engine.volume, dask.array as da\n"
                  "print(json.dumps(getattr(da.core, 'xr', xarray) is xarray))")
    assert got is True
