#!/usr/bin/env bash
# Issue 17's 16-core measurements in one call on the GPU machine (16 cores, 128 GiB), for
# a session that is lent one. Prepare here first:
#     bash tests/benchmarks/device/wheels.sh
# then, with the device tool, one call (its steps are capped at 330 + 150 + 90 s):
#     run(command="bash tests/benchmarks/device/run.sh", carry=[".whl"], timeout_s=600)
# What it runs (each benchmark's last stdout line is its JSON; logs come back in $OUT):
#   1. bench_scale scaling, segment only, 1, 2, 4, 8, 16 workers × 1 thread and 4 × 4
#      (parallel efficiency at 16 threads; the issue's target is ≥ 0.6);
#   2. bench_segment at 512³ on 4 workers × 4 threads against the in-memory pipeline (the
#      largest process's peak RSS against the in-memory one's);
#   3. bench_scale runner with simulated blocks at 1–16 workers (the runner alone).
# SIZE, CONFIGS, REPEATS and PY change the shape of the run (a rehearsal on a small
# machine: SIZE=128 CONFIGS=1x1,2x1 REPEATS=1 PY=.venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-python3}
SIZE=${SIZE:-512}
CONFIGS=${CONFIGS:-1x1,2x1,4x1,8x1,16x1,4x4}
REPEATS=${REPEATS:-2}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{ nproc; free -g | head -2; "$PY" -c "import dask, distributed, zarr, numpy, scipy, skimage;
print('dask', dask.__version__, 'zarr', zarr.__version__, 'numpy', numpy.__version__,
      'scipy', scipy.__version__, 'skimage', skimage.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
step() {  # name, seconds, command...: its output in $OUT/name.log, its JSON line in $OUT/name.json
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $SECONDS s in all"
    grep '^{' "$OUT/$name.log" | tail -1 | tee "$OUT/$name.json"
}
step scaling 330 "$PY" tests/benchmarks/bench_scale.py scaling --size "$SIZE" --configs "$CONFIGS" \
    --only segment --repeats "$REPEATS" --workdir "$WORK/scaling"
step segment 150 "$PY" tests/benchmarks/bench_segment.py --size "$SIZE" --skip-daskimage \
    --workers 4 --threads 4 --repeats 1 --workdir "$WORK/segment"
step runner 90 "$PY" tests/benchmarks/bench_scale.py runner --configs 1,2,4,8,16 --repeats 1 \
    --workdir "$WORK/runner"
rm -rf "$WORK"
