#!/usr/bin/env bash
# One-command GPU check of a prebuilt gsrq wheel: install it (no build), run
# the GPU tests and both decode benchmarks, and write everything into OUTDIR.
#
#   benches/gpu_check.sh WHEEL OUTDIR
#
# Run from a gsrq checkout (for tests/ and benches/). The GPU host needs
# Python with torch, transformers, cuda-core (cuda-bindings) and pytest; the
# wheel is installed with --no-deps into OUTDIR/site and put first on
# PYTHONPATH, so the checkout's python/ sources are not used. Every part is
# time-boxed; the whole check stays under 10 minutes. Nothing is compiled.
#
# Outputs: info.txt (gsrq info), gpu-tests.log + gpu-tests.xml (pytest/junit),
# decode_attention.md, decode_e2e.md, summary.txt. Exit status: that of the tests.
set -u -o pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 WHEEL OUTDIR" >&2
    exit 2
fi
WHEEL=$1
OUT=$2
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T_TESTS=${GSRQ_CHECK_TEST_SECONDS:-270}
T_ATTN=${GSRQ_CHECK_ATTN_SECONDS:-150}
T_E2E=${GSRQ_CHECK_E2E_SECONDS:-150}

[ -f "$WHEEL" ] || { echo "no wheel at $WHEEL" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE="$OUT/site"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

log "installing $WHEEL into $SITE (no dependencies, no build)"
rm -rf "$SITE"
if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation --only-binary=:all: --target "$SITE" "$WHEEL" \
        > "$OUT/install.log" 2>&1; then
    log "pip install failed (see install.log)"
    exit 2
fi
export PYTHONPATH="$SITE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"

"$PY" -c "import gsrq, sys; sys.exit(0 if gsrq.__file__.startswith('$SITE') else 'gsrq was not imported from the wheel: ' + gsrq.__file__)" \
    >> "$OUT/summary.txt" 2>&1 || { log "the installed wheel is not the gsrq being imported"; exit 2; }
timeout 60 "$PY" -m gsrq.kernels > "$OUT/info.txt" 2>&1
log "gsrq info: $(head -1 "$OUT/info.txt")"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "no CUDA device on this machine: GPU tests and benchmarks are skipped"
fi

log "GPU tests (limit ${T_TESTS}s)"
timeout --signal=INT --kill-after=20 "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/gpu \
    --junitxml="$OUT/gpu-tests.xml" -o junit_family=xunit2 > "$OUT/gpu-tests.log" 2>&1
TEST_RC=$?
log "GPU tests exit $TEST_RC: $(tail -1 "$OUT/gpu-tests.log")"

log "decode attention benchmark (limit ${T_ATTN}s)"
timeout --kill-after=10 "$T_ATTN" "$PY" benches/bench_decode_attention.py --iters 30 \
    --budget $(( T_ATTN - 40 )) --out "$OUT/decode_attention.md" > "$OUT/decode_attention.log" 2>&1
log "decode attention benchmark exit $?"

log "end-to-end decode benchmark (limit ${T_E2E}s)"
timeout --kill-after=10 "$T_E2E" "$PY" benches/bench_decode_e2e.py --batch 1,8 --ctx 4096,16384,32768 --steps 16 \
    --budget $(( T_E2E - 60 )) --out "$OUT/decode_e2e.md" > "$OUT/decode_e2e.log" 2>&1
log "end-to-end benchmark exit $?"

log "done in $(( $(date +%s) - START ))s; tables: $OUT/decode_attention.md $OUT/decode_e2e.md"
exit $TEST_RC
