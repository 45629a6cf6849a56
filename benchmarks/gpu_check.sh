#!/usr/bin/env bash
# The GPU check of the cuda device, for a lent GPU machine (no network there), in one go
# (well under 8 minutes on an H100): install pipellm from this checkout without network,
# run the GPU tests (kernels and the cuda device on the real GPU), then the GPU figures
# (kernel GB/s by size, plain pinned H2D, cc / pipellm encrypted H2D by size and workers)
# into $OUT (or ./gpu-results): gpu.json, gpu.png, the logs.
#
# Prepare here, once (the GPU image has numba, numba-cuda, cython, pytest, hypothesis,
# matplotlib, but not cryptography), in the repo's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl 'cryptography>=50' cffi pycparser
# then run it with `.whl` carried:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3 | tee "$out/install.log"
python3 -c "import pipellm._ext.cudadriver" 2>&1 | tee -a "$out/install.log"   # the cydriver layer: built?
export PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/cudasim tests/test_kernels.py tests/test_cudadriver.py tests/test_torch.py 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
timeout 300 python3 -m pipellm.benchmarks.gpu --out "$out/gpu.json" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "tests rc=$tests bench rc=$bench"
exit $(( tests != 0 || bench != 0 ))
