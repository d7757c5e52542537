#!/usr/bin/env bash
# The last call of a measurement on a GPU machine without network (docs/benchmarks.md, "Measuring on a GPU"): joins
# the onnxruntime-gpu parts of bench/gpu-pack.sh that earlier calls left in /tmp/ort (and any carried in .gpu/),
# installs them and .gpu/wheels under /tmp/site, then runs bench/gpu.py with its results under $OUT. Arguments go
# to bench/gpu.py.
set -euo pipefail
mkdir -p /tmp/ort /tmp/site
cp -n .gpu/ort.part-* /tmp/ort/ 2>/dev/null || true
[ -d /tmp/site/onnxruntime ] || cat /tmp/ort/ort.part-* | xz -dc | tar -x -C /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 bench/gpu.py --sentences .gpu/sentences.txt --out "${OUT:-runs/gpu-results}" "$@"
