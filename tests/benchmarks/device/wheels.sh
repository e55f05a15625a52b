#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (its image has Python 3.12, torch,
# numpy, scipy, scikit-image, tifffile, psutil, pyyaml, typer, rich, msgpack, cloudpickle,
# toolz, xarray …, but not dask, distributed, zarr, numcodecs or monai) into .whl/ of the
# repository root, ignored by git, for `device.run(carry=[".whl"])`; run.sh installs them
# there. Versions are this machine's .venv's, so both sides run the same stack.
# Usage, from the repository root:  bash tests/benchmarks/device/wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
# what the engine and the benchmarks import that the GPU image does not hold
names="dask distributed zarr numcodecs donfig google-crc32c tornado tblib zict locket partd
       mrcfile monai ome-zarr ome-zarr-models pydantic pydantic-core pydantic-zarr
       typing-inspection annotated-types deprecated wrapt"
pins=()
for n in $names; do
    v=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$n")
    pins+=("$n==$v")
done
rm -rf .whl && mkdir .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_34_x86_64; do
    plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl "${pins[@]}"
du -sh .whl
