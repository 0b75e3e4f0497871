#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/README.md, "GPU suite"):
#   bash benchmarks/gpu/run.sh [--cpu-smoke] [--out DIR] [--budget-s 480] [--skip STEP ...]
# On the GPU machine: installs the wheels carried in .whl/ (filled here by
# benchmarks/gpu/fill_wheels.sh) into /tmp/site when zarr/dask/snakemake/open_clip are missing,
# then runs benchmarks/gpu/suite.py, writing into $OUT (the device tool's folder) or --out.
# --cpu-smoke: the same steps at tiny size on the CPU (CI rehearses it: tests/test_gpu_suite.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
args=("$@")
have_out=0
for a in "$@"; do [ "$a" = "--out" ] && have_out=1; done
[ $have_out = 1 ] || args+=(--out "${OUT:-benchmarks/out/gpu}")
if ! $PY -c "import zarr, dask, numcodecs, snakemake, open_clip, jsonschema" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "run.sh: zarr/dask/snakemake/open_clip missing and no wheels in .whl/ (fill it with benchmarks/gpu/fill_wheels.sh and carry .whl)" >&2
    exit 3
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$(dirname "$(command -v $PY)"):$PATH"   # `python` in rule shells = this interpreter
command -v python >/dev/null 2>&1 || { mkdir -p /tmp/sc-bin && ln -sf "$(command -v $PY)" /tmp/sc-bin/python && export PATH="/tmp/sc-bin:$PATH"; }
exec $PY benchmarks/gpu/suite.py "${args[@]}"
