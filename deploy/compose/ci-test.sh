#!/usr/bin/env bash
# Build the CPU image of deploy/compose offline and run the compose stack for real:
#
#   1. a base image made here: debootstrap of Debian bookworm (python3, python3-venv), then
#      `docker import` (no registry is needed; skipped when the image exists);
#   2. a wheelhouse built on the host (`pip wheel` of voxelmill[learn] with constraints.txt,
#      `pip download` of the build backend) into deploy/compose/wheels/;
#   3. `docker build` of deploy/compose/Dockerfile with --build-arg BASE=that image (pip
#      installs with --no-index from the wheelhouse);
#   4. the stack of deploy/compose/docker-compose.yml as it is (TLS on): a scheduler and two
#      workers; the `cli` service converts and segments a volume on the shared /data mount
#      through tls://scheduler:8786; the result must equal a run of the same commands on the
#      host's embedded cluster, and the dashboard must answer HTTP on its published port.
#
# Needs root, a running Docker engine, docker-compose (v1 or the v2 plugin), debootstrap and
# a voxelmill virtual environment on the host (PYTHON, default .venv/bin/python). Prints the
# time of every step. Leaves no container running. Usage:
#
#   deploy/compose/ci-test.sh [WORKDIR]     # default: a fresh temporary folder
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
VOXELMILL=$(dirname "$PYTHON")/voxelmill
BASE_IMAGE=${VOXELMILL_BASE:-voxelmill-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${1:-$(mktemp -d /tmp/voxelmill-compose-XXXXXX)}
PROJECT=voxelmillci$$
export VOXELMILL_DASHBOARD_PORT=${VOXELMILL_DASHBOARD_PORT:-18787}

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else echo "ci-test: no docker compose" >&2; exit 1; fi
docker info >/dev/null 2>&1 || { echo "ci-test: the Docker engine does not answer (start dockerd)" >&2; exit 1; }

T0=$(date +%s.%N)
step() { printf 'ci-test: %-60s %6.1f s\n' "$1" "$(echo "$(date +%s.%N) - $T0" | bc)"; T0=$(date +%s.%N); }

# 1. the base image
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    root=$(mktemp -d /tmp/voxelmill-rootfs-XXXXXX)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
    step "base image $BASE_IMAGE (debootstrap + docker import)"
else
    step "base image $BASE_IMAGE exists"
fi

# 2. the wheelhouse (the image's python is bookworm's 3.11, as the host's must be)
WHEELS=$REPO/deploy/compose/wheels
# (a pip configuration's missing local index folders warn once per package: not shown)
"$PYTHON" -m pip wheel -q -w "$WHEELS" -c constraints.txt ".[learn]" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
"$PYTHON" -m pip download -q -d "$WHEELS" --only-binary=:all: setuptools wheel 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
rm -f "$WHEELS"/voxelmill-*.whl   # the image builds voxelmill from its own sources
step "wheelhouse ($(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sm "$WHEELS" | cut -f1) MiB)"

# 3. the image
docker build -q -f deploy/compose/Dockerfile --build-arg BASE="$BASE_IMAGE" -t voxelmill:cpu . \
    >/dev/null 2>"$WORK/build.log" || { cat "$WORK/build.log"; exit 1; }
step "docker build voxelmill:cpu"

# 4. the stack, in its own project folder: ./data and ./certs as the compose file mounts them
cp deploy/compose/docker-compose.yml "$WORK/"
mkdir -p "$WORK/data" "$WORK/local"
"$VOXELMILL" cluster certs "$WORK/certs" --host scheduler >/dev/null
chown -R 1000 "$WORK/data" "$WORK/certs"   # the containers run as uid 1000
"$PYTHON" - "$WORK/data/vol.mrc" <<'PY'
import sys

import mrcfile
import numpy as np
from scipy import ndimage

rng = np.random.default_rng(7)
vol = ndimage.gaussian_filter(rng.normal(size=(96, 160, 160)), 3).astype(np.float32)
with mrcfile.new(sys.argv[1], vol) as mrc:
    mrc.voxel_size = 10.0
PY
chown 1000 "$WORK/data/vol.mrc"
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/docker-compose.yml" "$@"; }
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
compose up -d --no-build --scale worker=2 scheduler worker >/dev/null 2>&1
for _ in $(seq 60); do
    workers=$(curl -sf "http://127.0.0.1:$VOXELMILL_DASHBOARD_PORT/json/counts.json" \
        | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["workers"])' 2>/dev/null || true)
    [ "${workers:-0}" -ge 2 ] && break
    sleep 1
done
[ "${workers:-0}" -ge 2 ] || { compose logs; echo "ci-test: 2 workers did not join" >&2; exit 1; }
step "stack up: scheduler + $workers workers joined, dashboard answers"
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$VOXELMILL_DASHBOARD_PORT/status")
[ "$status" = 200 ] || { echo "ci-test: dashboard /status answered $status" >&2; exit 1; }

run_cli() { compose run --rm -T cli voxelmill --tls /certs "$@" --scheduler tls://scheduler:8786; }
run_cli convert /data/vol.mrc /data/vol.ome.zarr --chunks 32,64,64 >"$WORK/convert.log" 2>&1 \
    || { cat "$WORK/convert.log"; exit 1; }
step "convert in the stack (96×160×160 float32)"
run_cli segment /data/vol.ome.zarr --workflow threshold --name objects --block 32,64,64 \
    >"$WORK/segment.log" 2>&1 || { cat "$WORK/segment.log"; exit 1; }
step "segment (threshold preset) in the stack"

# the same commands on this host's embedded cluster
"$VOXELMILL" convert "$WORK/data/vol.mrc" "$WORK/local/vol.ome.zarr" --chunks 32,64,64 >/dev/null 2>&1
"$VOXELMILL" segment "$WORK/local/vol.ome.zarr" --workflow threshold --name objects \
    --block 32,64,64 >/dev/null 2>&1
step "the same two commands on the host's embedded cluster"
"$PYTHON" - "$WORK/data/vol.ome.zarr" "$WORK/local/vol.ome.zarr" <<'PY'
import sys

import numpy as np
import zarr

stack, local = sys.argv[1:]
for name in ("0", "1", "labels/objects/0"):
    a = zarr.open_array(f"{stack}/{name}", mode="r")[...]
    b = zarr.open_array(f"{local}/{name}", mode="r")[...]
    assert a.dtype == b.dtype and np.array_equal(a, b), name
print(f"ci-test: stack output equals the local run (image levels 0-1, labels: "
      f"{int(a.max())} objects)")
PY
grep -h "blocks:" "$WORK/segment.log" | tail -1 | sed 's/^/ci-test: stack segment: /'
cleanup
trap - EXIT
step "stack down"
echo "ci-test: ok ($WORK)"
