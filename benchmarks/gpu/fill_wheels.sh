#!/usr/bin/env bash
# Fill the git-ignored .whl/ folder (repository root) with the wheels the GPU machine lacks, for
# Python 3.12 on x86-64 Linux. Run here, in the project's venv (it reads the installed versions),
# on a machine with PyPI access, once per dependency change:
#     . .venv/bin/activate && bash benchmarks/gpu/fill_wheels.sh
# It walks the installed dependency closure of zarr, dask, snakemake, open_clip_torch, jsonschema
# (+ what stitchcache imports), drops what the GPU image already has
# (benchmarks/gpu/gpu-image-packages.txt), and fetches the rest at the installed versions:
# a cp312 manylinux wheel where one exists, else a wheel built here (pure-Python sdists).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mapfile -t wanted < <($PY - benchmarks/gpu/gpu-image-packages.txt <<'PY'
import re, sys
from importlib import metadata
from packaging.requirements import Requirement
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(l.split()[0]) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
todo = ["zarr", "dask", "numcodecs", "snakemake", "open_clip_torch", "jsonschema", "pyyaml", "tqdm",
        "pygments", "pillow", "matplotlib"]
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
seen = {}
while todo:
    name = todo.pop()
    if norm(name) in seen:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue  # only needed under markers that don't apply here
    seen[norm(name)] = dist
    for r in dist.requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate(env):
            todo.append(req.name)
for key, dist in sorted(seen.items()):
    if key not in have:
        print(f"{dist.metadata['Name']}=={dist.version}")
PY
)
rm -rf .whl && mkdir -p .whl
for req in "${wanted[@]}"; do
  $PY -m pip download --no-deps --quiet -d .whl "${PLAT[@]}" "$req" 2>/dev/null \
    || $PY -m pip download --no-deps --quiet -d .whl --only-binary=:all: --platform any --python-version 3.12 "$req" 2>/dev/null \
    || $PY -m pip wheel --no-deps --quiet -w .whl "$req" \
    || { echo "fill_wheels: no wheel for $req" >&2; exit 1; }
done
echo "filled .whl/ with ${#wanted[@]} wheels ($(du -sh .whl | cut -f1)): ${wanted[*]}"
