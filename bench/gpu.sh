#!/usr/bin/env bash
# GPU figures for bench/RESULTS.md in one run (under 8 minutes on an H100): see
# bench/gpu_bench.py for what is measured.
#
#   bash bench/gpu.sh                # on a machine with a CUDA GPU
#   bash bench/gpu.sh --dry-run      # the same steps on the CPU at tiny sizes (CI runs this)
#   bash bench/gpu.sh --prepare      # here, with network: wheels of zarr & co. into .wheels/
#                                    # for a GPU machine whose Python lacks them (carry .wheels)
#
# Figures go to stdout and to $GPU_RESULTS (default: $OUT/gpu-results.txt when OUT is set,
# else /tmp/dynlab-gpu-results.txt). Uses .venv/bin/python when present, else python3, or
# $PYTHON; dynlab runs from this source tree when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    py=${PYTHON:-python3}
    # what the analysis needs beyond a CUDA image's usual packages (torch, numpy, xarray, ...)
    "$py" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels \
        zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.7.1
    echo "wheels in .wheels/ ($(du -sh .wheels | cut -f1)); carry .wheels to the GPU machine"
    exit 0
fi

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
if ! "$py" -c "import dynlab_cli" 2>/dev/null; then
    src=$(mktemp -d)
    ln -s "$PWD/cli" "$src/dynlab_cli"
    export PYTHONPATH="$PWD:$src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import zarr" 2>/dev/null && [ -d .wheels ]; then
    "$py" -m pip install -q --no-index --find-links .wheels zarr numcodecs donfig google-crc32c
fi
results=${GPU_RESULTS:-${OUT:-/tmp}/$([ -n "${OUT:-}" ] && echo gpu-results.txt || echo dynlab-gpu-results.txt)}
"$py" bench/gpu_bench.py "$@" 2>&1 | tee "$results"
echo "figures written to $results"
