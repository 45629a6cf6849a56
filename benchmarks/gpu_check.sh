#!/usr/bin/env bash
# The GPU check of the cuda device, for a lent GPU machine (no network there), in one go
# (under 6 minutes with the install: the steps after it share a budget, most important
# first, each cut at its own limit): install pipellm from this checkout without network,
# then the driver path's tests (the real driver path, the device suite on it), its
# figures (kernel GB/s, pinned H2D, plain / cc / pipellm H2D by size and workers), the
# adversary suite and the offload bench on it, then the numba path's figures and tests
# while time is left, into $OUT (or ./gpu-results): gpu.json (rewritten after each part),
# gpu.png, gpu-old.json, offload-cuda.json, the logs.
#
# Prepare here, once (the GPU image has numba, numba-cuda, cuda-bindings, cython, pytest,
# hypothesis, matplotlib, but not cryptography), in the repo's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl 'cryptography>=50' cffi pycparser
# and, for a profile of the copy-engine thread in the same run (optional), py-spy:
#   python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_5_x86_64 -d .whl py-spy
# then run it with `.whl` carried:  bash benchmarks/gpu_check.sh  (or ONLY=offload bash ...)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*"; }
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
step machine
{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc; python3 --version
  python3 -m pip list 2>/dev/null | grep -iE '^(numba|numba-cuda|cuda-bindings|cuda-core|cython|torch|numpy|setuptools|cryptography) '
} 2>&1 | tee "$out/machine.txt"
step install
timeout 120 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3 | tee "$out/install.log"
python3 -c "import pipellm._ext.cudadriver; print('cydriver layer: built')" 2>&1 | tail -1 | tee -a "$out/install.log"
if [ "${ONLY:-}" = offload ]; then
    # ONLY=offload: instead of the GPU steps, the emulated offload bench on this host's
    # cores, with the default cores - 1 workers and with one (issue 3's transfer-bound
    # figure: the bound of one worker); ~3 minutes each on 2 vCPUs
    rc=0
    for w in default 1; do
        step "offload, workers: $w"
        args=(); [ "$w" = default ] || args=(--workers "$w")
        timeout 200 python3 -c 'from pipellm.cli import main; main()' bench offload --no-progress \
            "${args[@]}" --out "$out/offload-$w.json" --plot "$out/offload-$w.png" 2>&1 \
            | tee "$out/offload-$w.log"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
    done
    exit "$rc"
fi
# The rest runs within BUDGET seconds (default 270: the whole call under 6 minutes with
# the install), most important first: the driver path's tests, its figures, the
# adversary suite on it, the offload bench on it; then, while time is left, the numba
# path's figures and tests. Each step is cut at its own limit or at what is left.
end=$((SECONDS + ${BUDGET:-270}))
bench=0; tests=0; adversary=0
limit() { local left=$((end - SECONDS)); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
room() { local need=$1; shift; [ $((end - SECONDS)) -ge "$need" ] || { step "skipped ($*): out of time"; return 1; }; }
if room 20 "driver path tests"; then
    step "driver path tests"
    # the real driver path (tests/test_cudadriver.py), then the cuda device's end-to-end tests on it
    timeout "$(limit 40)" python3 -m pytest -q -p no:cacheprovider tests/test_cudadriver.py 2>&1 | tail -5 \
        | tee "$out/driver-tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || tests=1
    PIPELLM_CUDA_DEVICE=driver timeout "$(limit 60)" python3 -m pytest -q -p no:cacheprovider \
        tests/cudasim/test_cuda_device_sim.py 2>&1 | tail -5 | tee -a "$out/driver-tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || tests=1
fi
if room 30 "figures, new path"; then
    step "figures: kernels, pinned copies, the driver path"
    timeout "$(limit 150)" python3 -m pipellm.benchmarks.gpu --part new --out "$out/gpu.json" 2>&1 | tee "$out/bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || bench=1
fi
if room 20 "adversary, driver path"; then
    step "adversary on the driver path"
    PIPELLM_TEST_DEVICE=cuda-driver timeout "$(limit 45)" python3 -m pytest -q -p no:cacheprovider \
        tests/test_adversary.py 2>&1 | tail -5 | tee "$out/adversary-driver.log"
    [ "${PIPESTATUS[0]}" = 0 ] || adversary=1
fi
if room 30 "offload, driver path"; then
    step "offload on the driver path"
    # the layer-sequential offload bench with its layers on the cuda device (driver path,
    # compute as a GPU kernel), quick sizes: plain / cc / pipellm in one run
    timeout "$(limit 90)" python3 -c 'from pipellm.cli import main; main()' bench offload --device cuda-driver \
        --quick --no-progress --out "$out/offload-cuda.json" 2>&1 | tail -30 | tee "$out/offload-cuda.log"
    [ "${PIPESTATUS[0]}" = 0 ] || bench=1
fi
if room 30 "figures, old path"; then
    step "figures: the numba path"
    timeout "$(limit 120)" python3 -m pipellm.benchmarks.gpu --part old --out "$out/gpu-old.json" 2>&1 \
        | tee "$out/bench-old.log"
    [ "${PIPESTATUS[0]}" = 0 ] || bench=1
fi
if [ -x /tmp/site/bin/py-spy ] && room 60 "profile"; then  # carried (see above)
    step profile
    timeout "$(limit 60)" /tmp/site/bin/py-spy record --threads --rate 400 --format raw -o "$out/profile.txt" -- \
        python3 -m pipellm.benchmarks.gpu --transfers-only --out "$out/profile.json" 2>&1 | grep -v Warning | tail -12
    python3 -m pipellm.benchmarks.gpu --summarize "$out/profile.txt" | tee "$out/profile-summary.txt"
fi
if room 30 "tests, numba path"; then
    step "tests: kernels, the numba path, torch"
    timeout "$(limit 90)" python3 -m pytest -q -p no:cacheprovider -x tests/cudasim tests/test_torch.py \
        tests/test_gpupath.py 2>&1 | tail -8 | tee "$out/tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || tests=1
fi
if room 20 "adversary, numba path"; then
    step "adversary on the numba path"
    PIPELLM_TEST_DEVICE=cuda timeout "$(limit 60)" python3 -m pytest -q -p no:cacheprovider tests/test_adversary.py \
        2>&1 | tail -5 | tee "$out/adversary.log"
    [ "${PIPESTATUS[0]}" = 0 ] || adversary=1
fi
step done
echo "tests rc=$tests bench rc=$bench adversary rc=$adversary"
exit $(( tests != 0 || bench != 0 || adversary != 0 ))
