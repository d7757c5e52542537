#!/usr/bin/env bash
# Packs what bench/gpu.py needs on an H100/H200 machine without network (Python 3.12, CUDA 13, cuDNN 9) into DEST
# (default .gpu, added to .git/info/exclude), in pieces that fit transfers of limited size (docs/benchmarks.md,
# "Measuring on a GPU"). Run in the project root after `make setup`:
#   DEST/ort.part-NN  onnxruntime-gpu with only the sm_90 kernels kept (bench/prune_fatbin.py), tar.xz split into
#                     parts of PART_MB MiB (about 60 MB in all); by default what a transfer of LIMIT_MB (64) MiB
#                     leaves beside the project's tracked tree, which travels with every part
#   DEST/wheels/      the server's other dependencies as Python 3.12 wheels, at this checkout's .venv versions
#   DEST/sentences.txt  Ding's held-out full sentences (make data), the sentences bench/gpu.py translates
set -euo pipefail
dest=${1:-.gpu}; ort_version=$(.venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)')
download() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"; }
mkdir -p "$dest/wheels"; work=$(mktemp -d)
download -d "$work" "onnxruntime-gpu==$ort_version"
(cd "$work" && unzip -q onnxruntime_gpu-*.whl && rm onnxruntime_gpu-*.whl)
.venv/bin/python bench/prune_fatbin.py "$work/onnxruntime/capi/libonnxruntime_providers_cuda.so"
rm -f "$work"/onnxruntime/capi/libonnxruntime.so.*   # the C API library; the Python module does not load it
tree_mib=$(( $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) / 1048576 + 1 ))
part_mib=${PART_MB:-$(( ${LIMIT_MB:-64} - tree_mib - 2 ))}
[ "$part_mib" -ge 4 ] || { echo "the tracked tree ($tree_mib MiB) leaves no room for parts in ${LIMIT_MB:-64} MiB" >&2; exit 1; }
rm -f "$dest"/ort.part-*
tar -C "$work" -cf - . | xz -T0 -6 | split -b "${part_mib}m" -d - "$dest/ort.part-"
rm -rf "$work"
pins=$(.venv/bin/pip freeze | grep -iE '^(grpcio|grpcio-health-checking|grpcio-reflection|protobuf|prometheus.client|nvidia-ml-py|sentencepiece)==')
download -d "$dest/wheels" $pins
.venv/bin/python bench/gpu.py --write-sentences "$dest/sentences.txt"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
ls -la "$dest" "$dest/wheels"
echo "the tracked tree: $tree_mib MiB; parts of $part_mib MiB: one transfer each, then the wheels with bench/gpu-run.sh"
