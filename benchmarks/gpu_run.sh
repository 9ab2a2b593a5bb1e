#!/usr/bin/env bash
# The GPU half of the casting and offloading issues, for a session that is lent a GPU machine: the
# `gpu` tests and the two benchmarks, each step short enough for one device call (10 minutes).
#
# Once, on the development machine (the device machine has PyTorch, Triton and peft, not diffusers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Then one device call per step, with `.whl` carried:
#   bash benchmarks/gpu_run.sh tests      # pytest -m gpu
#   bash benchmarks/gpu_run.sh casting    # benchmarks/casting.py at FLUX width, 1024x1024 latents
#   bash benchmarks/gpu_run.sh offload    # benchmarks/offload.py --device cuda (add WAN=1 for Wan-14B)
# Logs and JSON land in $OUT (the device tool brings them back).
set -uo pipefail
step=${1:?usage: gpu_run.sh tests|casting|offload}
out=${OUT:-/tmp/hookwise-gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; git log -1 --format='commit %h' 2>/dev/null; date -u; } | tee "$out/device-$step.txt"
case "$step" in
    tests) python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" ;;
    casting) python3 benchmarks/casting.py --device cuda --heads 24 --double 4 --single 8 --tokens 4096 \
        --json "$out/casting.json" 2>&1 | tee "$out/casting.log" ;;
    offload) python3 benchmarks/offload.py --device cuda ${WAN:+--wan} --json "$out/offload.json" 2>&1 | tee "$out/offload.log" ;;
    *) echo "unknown step $step: use tests, casting or offload" >&2; exit 2 ;;
esac
