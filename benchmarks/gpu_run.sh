#!/usr/bin/env bash
# The GPU measurements, for a session that is lent a GPU machine (PyTorch, Triton and peft there, not
# diffusers): the `gpu` tests, the casting and offloading benchmarks, and the step-cache harness.
#
# Once, on the development machine, in the repository root (the wheels travel with the device call):
#   grep -q '^/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 importlib_metadata zipp lazy-importer
# Then, with `.whl` carried:
#   COMMIT=<hash> bash benchmarks/gpu_run.sh all   # 1-4 below in order, each under its own time cap
#   bash benchmarks/gpu_run.sh tests      # 1. pytest -m gpu (-x)
#   bash benchmarks/gpu_run.sh casting    # 2. benchmarks/casting.py at FLUX width, 4096 image tokens
#   bash benchmarks/gpu_run.sh offload    # 3. benchmarks/offload.py --device cuda (add WAN=1 for Wan-14B)
#   bash benchmarks/gpu_run.sh cache      # 4. benchmarks/cache_quality.py --device cuda --repeats 1
# Each part writes its JSON / log under $OUT as soon as it ends (the offload benchmark after every
# variant), so a run stopped from outside keeps what it measured. Files in $OUT: run.log (every part's
# output), casting.json, offload.json, offload-trace.json.gz, cache.tar.gz (cache/ while it runs).
#
# Environment: COMMIT (the commit measured; the device copy may have no .git), DEVICE (default cuda;
# cpu for a dry run of the plumbing), HOOKWISE_GPU_SMALL=1 (every part at a tiny size), TOTAL_S (the
# whole run's wall budget, default 540 s: a part's cap shrinks to what is left; the cache part, last,
# gets all that is left), CAP_TESTS / CAP_CASTING / CAP_OFFLOAD / CAP_CACHE (seconds per part).
set -uo pipefail
step=${1:?usage: gpu_run.sh all|tests|casting|offload|cache|summary}
out=${OUT:-/tmp/hookwise-gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)
device=${DEVICE:-cuda}
small=${HOOKWISE_GPU_SMALL:-}
total=${TOTAL_S:-540}
reserve=15  # seconds kept for the summary and the archive
started=$(date +%s)
log="$out/run.log"
status="$(mktemp -d)/status"
: >"$status"

if ! python3 -c "import diffusers" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "installing .whl/*.whl failed" | tee -a "$log"; exit 1; }
        export PYTHONPATH=/tmp/site
    else
        echo "diffusers is missing and there is no .whl folder (carry it: see the top of this script)" | tee -a "$log"
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
    echo "== device"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "no nvidia-smi"
    fi
    python3 -c "
import torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f'missing ({exc})'
import diffusers
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| triton', tv, '| diffusers', diffusers.__version__)
"
    echo "commit $commit; $(nproc) cores; $(date -u); device=$device small=${small:-0} total=${total}s"
} 2>&1 | tee -a "$log"

# cap NAME SECONDS: the part's cap, never past the whole run's budget (less the reserve).
cap() {
    local left=$((total - ($(date +%s) - started) - reserve))
    local want=$2
    if [ "$1" = last ]; then want=$((left > want ? left : want)); fi
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 5 ] && want=5
    echo "$want"
}

# part NAME CAP COMMAND...: run it under `timeout`, its output appended to run.log, its status recorded.
part() {
    local name=$1 seconds=$2
    shift 2
    local t0=$(date +%s)
    echo "== $name (cap ${seconds}s): $*" >>"$log"
    printf '%s: started, cap %ss\n' "$name" "$seconds"
    timeout -k 5 "$seconds" "$@" >>"$log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    local what=ok
    [ "$rc" -ne 0 ] && what="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT after ${seconds}s (rc=$rc)"
    echo "$name: $what, ${took}s" | tee -a "$log" >>"$status"
    echo "== $name: $what, ${took}s" >>"$log"
    if [ "$rc" -ne 0 ]; then
        echo "---- last lines of $name"
        awk -v n="== $name (cap" 'index($0, n) == 1 {keep = ""} {keep = keep $0 "\n"} END {printf "%s", keep}' "$log" | tail -n 25
        echo "----"
    fi
    return 0
}

run_tests() {
    part tests "$(cap tests "${CAP_TESTS:-120}")" python3 -m pytest -q -x -m gpu tests -p no:cacheprovider
}

run_casting() {
    local size=(--heads 24 --double 4 --single 8 --tokens 4096 --repeats 5)
    [ -n "$small" ] && size=(--heads 2 --double 1 --single 2 --tokens 64 --repeats 1)
    part casting "$(cap casting "${CAP_CASTING:-90}")" python3 benchmarks/casting.py --device "$device" "${size[@]}" --json "$out/casting.json"
}

run_offload() {
    local extra=()
    [ -n "$small" ] && extra+=(--small --steps 1)
    [ "$device" = cpu ] && extra+=(--gpu-path)
    [ -n "${WAN:-}" ] && extra+=(--wan)
    part offload "$(cap offload "${CAP_OFFLOAD:-240}")" python3 benchmarks/offload.py --device "$device" "${extra[@]}" \
        --json "$out/offload.json" --trace "$out/offload-trace.json.gz"
}

run_cache() {
    local extra=(--repeats 1)
    [ -n "$small" ] && extra+=(--models flux-shapes --steps 3)
    part cache "$(cap last "${CAP_CACHE:-90}")" python3 benchmarks/cache_quality.py --device "$device" --threads 1 "${extra[@]}" --out "$out/cache"
    # The plots and JSONs in one archive: the device tool returns a few files only.
    if [ -d "$out/cache" ] && [ -n "$(ls -A "$out/cache")" ]; then
        tar -czf "$out/cache.tar.gz" -C "$out" cache && rm -rf "$out/cache"
    fi
}

summary() {
    echo
    echo "== summary (commit $commit, $(($(date +%s) - started))s in all)"
    cat "$status"
    grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|(passed|failed|skipped|error)s? in [0-9.]+s' "$log" | tail -n 2
    python3 - "$out" <<'EOF'
import json, math, os, sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except Exception as exc:
        print(f"{name}: unreadable ({exc})")
        return None


casting = load("casting.json")
if casting:
    rows = casting["rows"]
    base = rows[0]
    print("casting (forward ms, x bf16, out rel err, saved-for-backward x bf16):")
    for r in rows:
        saved = f"{r['saved_bytes'] / base['saved_bytes']:.3f}" if "saved_bytes" in r and base.get("saved_bytes") else "-"
        print(f"  {r['variant']:40s} {r['forward_s'] * 1e3:8.2f} {r['forward_s'] / base['forward_s']:6.3f} {r['error']:.5f} {saved}")
offload = load("offload.json")
if offload:
    env = offload["env"]
    print(f"offload on {env.get('gpu')}: h2d {env.get('h2d_GBps', float('nan')):.1f} GB/s{' (partial)' if offload.get('partial') else ''}")
    for label, results in offload["models"].items():
        print(f"  {label}: variant, s/step, peak VRAM GiB, VRAM after apply GiB, streamed GiB/step, x bound")
        for r in results:
            if r.get("error"):
                print(f"    {r['name']:32s} FAILED {r['error'].splitlines()[0][:110]}")
                continue
            def f(v, fmt):
                return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
            ratio = r["step_s"] / r["bound_s"] if r.get("bound_s") else None
            print(f"    {r['name']:32s} {r['step_s']:7.3f} {f(r['peak_vram_gib'], '7.2f')} {f(r.get('vram_after_apply_gib'), '7.2f')} "
                  f"{f(r['streamed_gib_per_step'], '7.2f')} {f(ratio, '6.2f')}")
        trace = [r["notes"]["trace"] for r in results if isinstance(r.get("notes"), dict) and "trace" in r["notes"]]
        if trace:
            print(f"  trace: {trace[0]}")
import tarfile

cache = os.path.join(out, "cache.tar.gz")
names = []
if os.path.exists(cache):
    with tarfile.open(cache) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                names.append((member.name, json.load(tar.extractfile(member))))
elif os.path.isdir(os.path.join(out, "cache")):
    for n in sorted(os.listdir(os.path.join(out, "cache"))):
        if n.endswith(".json"):
            with open(os.path.join(out, "cache", n)) as f:
                names.append((n, json.load(f)))
for name, rows in names:
    failed = [r for r in rows if (r.get("note") or "").startswith("failed")]
    ref = {r["setting"]: r["seconds"] for r in rows if r["impl"] == "reference"}
    best = {}
    for r in rows:
        if r["impl"] in ("hookwise", "diffusers") and r.get("default"):
            if r["speedup"] is None:  # a failed run
                best.setdefault(r["impl"], []).append(f"{r['method']} failed")
                continue
            db = float(r["psnr"]) if r["psnr"] is not None else float("nan")  # "inf": identical samples
            best.setdefault(r["impl"], []).append(f"{r['method']} {r['block_frac']:.2f} evals {db:.1f} dB x{r['speedup']:.2f}")
    print(f"cache {name}: {len(rows)} runs, {len(failed)} failed, uncached s {ref}")
    for impl, lines in best.items():
        print(f"  {impl} defaults: " + "; ".join(str(x) for x in lines)[:400])
EOF
    echo "files in $out:"
    ls -la "$out"
}

case "$step" in
    all)
        run_tests
        run_casting
        run_offload
        run_cache
        summary 2>&1 | tee -a "$log"
        ;;
    tests) run_tests; summary ;;
    casting) run_casting; summary ;;
    offload) run_offload; summary ;;
    cache) run_cache; summary ;;
    summary) summary ;;
    *) echo "unknown step $step: use all, tests, casting, offload, cache or summary" >&2; exit 2 ;;
esac
