#!/usr/bin/env bash
# The GPU checks in one prepared call, for a lent GPU machine (the device tool: one H100/H200 with
# about 15 minutes of device time per session, start-up included, and at most 10 minutes per
# command). Run from the repository root. Each stage has its own time limit and writes into $OUT
# as it goes, so a stage that overruns still leaves what the others measured.
#
#   bash benchmarks/gpu_session.sh                          # build gpu bench (the default)
#   STAGES="build e2e" bash benchmarks/gpu_session.sh       # a later call: the end-to-end run
#
# A later call almost always gets a bare machine (a warm one is given back after 30 s idle), so
# every call lists build: without it diffaccel imports from the source tree, where _C and
# diffaccel.kernels are missing and every op would run its torch reference. A call without build
# checks that they import and stops otherwise.
#   BENCH_K="gemm and 4096" bash benchmarks/gpu_session.sh  # a subset of the microbenchmarks
#
# The whole microbenchmark suite is 823 cases (gemm 438, attention 210, quantize 76, solver 60,
# conv 39), each compiling its Triton kernels on first use: more than one call's 10 minutes.
# Give one or two families per call, e.g. BENCH_FILES="benchmarks/bench_gemm.py benchmarks/bench_conv.py".
# The default is gemm and solver: attention autotuning faulted once (an illegal memory access poisons
# the process's CUDA context, failing every case after it), so run it after a clean configs stage.
#
# Stages, in this order whatever STAGES lists:
#   build   pip install -e . with CUDA for this GPU's arch only (DIFFACCEL_CUDA_ARCH overrides)
#   configs each attention autotune config alone     -> $OUT/attention-configs.json
#   gemmcfg candidate int8 / W4A8 / fp8 GEMM tiles checked, then timed -> $OUT/gemm-configs.json
#   gpu     pytest -m gpu, one process per test file, GPU_WORKERS (6) at a time: a kernel that faults
#           fails only its own file                -> $OUT/gpu-tests.tgz (GPU_BY_FILE=0: one process
#                                                     -> $OUT/gpu-junit.xml); GPU_FILES="tests/a.py
#                                                     tests/b.py" runs only those files
#   bench   pytest $BENCH_FILES [-k $BENCH_K]      -> $OUT/raw.json (then: python -m benchmarks.results)
#   host    per eager call on the GPU: diffaccel's Python, + Triton's launcher, + the GPU (python -m
#           benchmarks.host_overhead --gpu; about a minute) -> $OUT/host-overhead.json
#   e2e     python -m benchmarks.e2e $E2E_ARGS     -> $OUT/e2e.json, a raw file for python -m benchmarks.results
#                                                     (one model per call fits: E2E_ARGS defaults to
#                                                     --models sdxl; --models flux in another call)
#   static  the static kernel report with the _C just built -> $OUT/static-report.md
# Limits per stage in seconds: LIMIT_BUILD, LIMIT_GPU, LIMIT_BENCH, LIMIT_E2E, LIMIT_STATIC. TOTAL_LIMIT
# (default 560: the device tool kills a command at 600 s, and a killed pytest writes no JSON) caps
# them all: each stage gets at most what is left of it, so the last stage still ends on its own.
# Wheels in .whl/ are installed first (the H200 image has no diffusers; BENCHMARKS.md says how
# to fetch them). Everything printed also goes to $OUT/session.log; $OUT/env.txt records the
# device, versions and commit; $OUT/build.log the extension build. The device tool returns at most 8
# files: session.log and env.txt, build.log, and one or two per other stage (configs, gemmcfg: a JSON
# each; gpu: a tgz; bench: raw.json; host, e2e: a JSON each; static: a markdown file), so at most five
# stages besides build in one call.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build gpu bench"}
KNOWN_STAGES="build configs gemmcfg gpu bench host e2e static"
n_out=0
for s in $STAGES; do  # a typo ("bnech", "build,bench") must not silently run nothing
    [[ " $KNOWN_STAGES " == *" $s "* ]] || { echo "STAGES: unknown stage '$s' (known: $KNOWN_STAGES)"; exit 2; }
    [[ $s == build ]] || n_out=$((n_out + 1))
done
(( n_out <= 5 )) || { echo "STAGES: $n_out stages besides build write more files than the device tool returns (8)"; exit 2; }
for var in GPU_FILES BENCH_FILES; do  # checked before build spends device time, not when their stage starts
    [[ -n ${!var+x} ]] || continue
    for f in ${!var}; do [[ -f $f ]] || { echo "$var: no file $f"; exit 2; }; done
    [[ -n ${!var// /} ]] || { echo "$var: empty"; exit 2; }
done
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
exec > >(tee -a "$OUT/session.log") 2>&1
TEE_PID=$!
FAILED=""  # stages whose command failed or timed out: the exit status says so
finish() {  # the last lines reach session.log before the device tool collects $OUT
    local rc=$1
    echo "== done after ${SECONDS}s${FAILED:+; failed:$FAILED}"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$rc"
}

want() { [[ " $STAGES " == *" $1 "* ]]; }
TOTAL_LIMIT=${TOTAL_LIMIT:-560}
stage() {  # stage NAME LIMIT CMD...: run CMD under a time limit, report its exit status and time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS left=$(( TOTAL_LIMIT - SECONDS ))
    if (( left < 60 )); then
        echo "== $name: skipped, ${left}s of TOTAL_LIMIT=${TOTAL_LIMIT}s left"
        return 124
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    # pytest stops starting tests 45 s before the limit (the conftests read this), so its JSON and
    # junit reports of what ran are written; timeout is the backstop
    DIFFACCEL_PYTEST_DEADLINE=$(( $(date +%s) + limit - 45 )) timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: rc=$rc after $((SECONDS - t0))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
    (( rc != 0 )) && FAILED="$FAILED $name"
    return $rc
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheels failed"; finish 1; }
fi

{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    nvcc --version 2>&1 | tail -1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

if want build; then
    # one arch: Hopper needs its 'a' target for wgmma; four times faster than the default three-arch build
    ARCH=${DIFFACCEL_CUDA_ARCH:-$(python3 -c "import torch; c = torch.cuda.get_device_capability(); \
print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")}
    # the build log comes back ($OUT/build.log); a failed CUDA build falls back to C++ only, so the
    # Triton kernels and the torch references are still tested on the GPU (info says _C has no CUDA)
    # (the pip output goes to build.log, the stage's own lines to session.log)
    if ! DIFFACCEL_CUDA_ARCH=$ARCH stage build "${LIMIT_BUILD:-240}" \
            sh -c 'exec python3 -m pip install --no-build-isolation --no-deps -e . > "$0" 2>&1' "$OUT/build.log"; then
        tail -40 "$OUT/build.log"
        echo "== build: CUDA build failed; building C++ only (DIFFACCEL_SKIP_CUDA_BUILD=1)"
        DIFFACCEL_SKIP_CUDA_BUILD=1 stage build-cpp 180 \
            python3 -m pip install -q --no-build-isolation --no-deps -e . || finish 1
    fi
    python3 -m diffaccel info || finish 1
else
    python3 -c "import diffaccel._C, diffaccel.kernels" || {
        echo "diffaccel is not built on this machine (a bare one): add build to STAGES, or every op runs its torch reference"
        finish 2; }
fi
if want configs; then
    stage configs "${LIMIT_CONFIGS:-150}" python3 -m benchmarks.attention_configs --out "$OUT/attention-configs.json"
fi
if want gemmcfg; then
    stage gemmcfg "${LIMIT_GEMMCFG:-240}" python3 -m benchmarks.gemm_configs --out "$OUT/gemm-configs.json"
fi
if want gpu && [[ ${GPU_BY_FILE:-1} == 1 ]]; then
    # one pytest process per test file, GPU_WORKERS at a time: a kernel that faults (an illegal memory
    # access poisons the CUDA context) fails only its own file; junit + log per file in $OUT/gpu-tests.tgz
    rm -rf /tmp/gpu-tests && mkdir -p /tmp/gpu-tests
    PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
    export PER_TEST
    # largest files first (they hold the most GPU tests): the ones that start last get the least time
    # GPU_FILES narrows the stage to some test files (e.g. what changed since the last GPU run)
    export GPU_FILES=${GPU_FILES:-$(grep -l "mark.gpu" tests/*.py | tr '\n' ' ')}
    stage gpu "${LIMIT_GPU:-300}" bash -c 'ls -S $GPU_FILES | xargs -P "${GPU_WORKERS:-6}" -I{} \
        sh -c "f=\$(basename {} .py); python3 -m pytest -m gpu -q -p no:cacheprovider $PER_TEST -rfE \
               --junitxml=/tmp/gpu-tests/\$f.xml {} > /tmp/gpu-tests/\$f.log 2>&1"'
    tail -n 3 /tmp/gpu-tests/*.log
    tar czf "$OUT/gpu-tests.tgz" -C /tmp gpu-tests
elif want gpu; then
    # a hung test costs its own 120 s, not the stage (pytest-timeout is on the H200 image)
    PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
    # GPU_WORKERS > 1: pytest-xdist workers share the GPU (most of a test's time is compiling its Triton
    # kernels on the CPU); timing lives in the bench stage, which always runs alone
    XDIST=$( (( ${GPU_WORKERS:-1} > 1 )) && python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_WORKERS}")
    stage gpu "${LIMIT_GPU:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider $PER_TEST $XDIST -rfE \
        --junitxml="$OUT/gpu-junit.xml" ${GPU_FILES:-tests/}
fi
if want bench; then
    # shellcheck disable=SC2086  # BENCH_FILES is a list of paths
    stage bench "${LIMIT_BENCH:-240}" python3 -m pytest ${BENCH_FILES:-benchmarks/bench_gemm.py benchmarks/bench_solver.py} -q -p no:cacheprovider --benchmark-enable \
        --benchmark-json="$OUT/raw.json" ${BENCH_K:+-k "$BENCH_K"}
fi
if want host; then
    stage host "${LIMIT_HOST:-120}" python3 -m benchmarks.host_overhead --gpu --out "$OUT/host-overhead.json"
fi
if want e2e; then
    # shellcheck disable=SC2086  # E2E_ARGS: e.g. "--models sdxl --variants baseline:diffusers-eager,diffaccel:attn+w8a8"
    stage e2e "${LIMIT_E2E:-420}" python3 -m benchmarks.e2e --out "$OUT/e2e.json" ${E2E_ARGS:---models sdxl}
fi
if want static; then
    SO=$(python3 -c "import diffaccel._C as c; print(c.__file__)")
    stage static "${LIMIT_STATIC:-120}" python3 -m benchmarks.static_report --so "$SO" \
        --markdown "$OUT/static-report.md"
fi
finish "$([[ -n $FAILED ]] && echo 1 || echo 0)"
