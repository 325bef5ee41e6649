#!/usr/bin/env bash
# The one-command GPU suite, for a fresh GPU machine with the repository copied in (not pip-installed),
# no internet and nothing installable (the target image: Python 3.12, torch 2.11+cu130, triton 3.6).
#
#   benchmarks/device_suite.sh [--dry-run] [--budget SECONDS] [--out DIR]
#
# Within the budget (default 570 s, under 10 minutes), in this order, each step time-boxed:
#   1. build   the extension for sm_90 only:  QRLORA_CUDA_ARCHS=90 python setup.py build_ext --inplace
#   2. gpu     the GPU-marked tests:          python -m pytest -m gpu tests
#   3. cuda    the QRCP / kernel / op / layer tests on cuda:  python -m pytest -k cuda tests/test_{qrcp,kernels,ops,functional,layer}.py
#   4. bench   the throughput suite (quick):  python -m benchmarks.throughput --quick --no-qr --time-budget 100
#   5. qr      the QR benchmark at 4096^2:    python -m benchmarks.throughput --only qr   (calls benchmarks.qr)
#   6. init    if time is left: converting 2 Llama-7B-shaped layers (rank 8; Frobenius tau 0.9, geqp3 and
#              randomized):  python -m benchmarks.init_time --shapes llama7b --layers 2 ...
# Everything (logs, JSON, CSV, PNG, steps.tsv) goes to ONE folder, benchmarks/results/<date>-<gpu>/; the last
# thing printed is a short summary table (python -m benchmarks.throughput --summary DIR).
#
# Without a GPU it stops at once: exit 3, "no CUDA GPU". --dry-run checks that every step's command would
# start (interpreter, setup.py, pytest, the benchmark modules, a writable results folder) without running
# them, then checks the GPU the same way (exit 2 if a command would not start, 3 if there is no GPU).
set -uo pipefail

dry_run=0
budget="${QRLORA_SUITE_BUDGET_S:-570}"
out_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --budget) budget="${2:-}"; shift 2 ;;
        --out) out_dir="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$budget" =~ ^[0-9]+$ ]] || (( budget < 60 )); then
    echo "device_suite.sh: --budget must be a whole number of seconds >= 60, got '$budget'" >&2
    exit 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
start_s=$SECONDS

probe_gpu() {  # sets gpu (the device name, empty without one) and torch_version, with one interpreter start
    local out
    out="$("$PYTHON" -c "import torch; print(torch.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)"
    torch_version="$(sed -n 1p <<< "$out")"
    gpu="$(sed -n 2p <<< "$out")"
}
no_gpu() {
    echo "device_suite.sh: no CUDA GPU: torch.cuda.is_available() is False (torch ${torch_version:-not importable}); this suite needs an NVIDIA GPU. Nothing was run." >&2
    exit 3
}
test_files() {
    local f files=()
    # test_qrcp.py first: the CUDA QRCP back end has never run on a GPU, and its checks are quick.
    for f in tests/test_qrcp.py tests/test_kernels.py tests/test_ops.py tests/test_functional.py tests/test_layer.py; do
        [[ -f "$f" ]] && files+=("$f")
    done
    echo "${files[@]}"
}

if (( dry_run )); then
    failed=0
    check() {  # name, command...: does the step's command start?
        local name="$1"; shift
        if "$@" >/dev/null 2>&1; then echo "ok    $name: $*"; else echo "FAIL  $name: $* would not start" >&2; failed=1; fi
    }
    check timeout timeout 5 true
    check build "$PYTHON" setup.py --name
    check gpu-tests "$PYTHON" -m pytest --version
    check cuda-tests test -n "$(test_files)"
    check bench "$PYTHON" -m benchmarks.throughput --help
    # The qr step and the summary are further entry points of the same module: import what they call.
    check qr+summary "$PYTHON" -c "import triton, benchmarks.qr; from benchmarks.throughput import run_qr_section, summarize"
    check init "$PYTHON" -m benchmarks.init_time --help
    probe="$(mkdir -p "$repo/benchmarks/results" && mktemp -d "$repo/benchmarks/results/.dry-run.XXXXXX" 2>/dev/null)" \
        && rmdir "$probe"
    check results-folder test -n "$probe"
    (( failed )) && { echo "device_suite.sh: dry run: a step's command would not start (see FAIL above)" >&2; exit 2; }
    probe_gpu
    [[ -n "$gpu" ]] || no_gpu
    echo "dry run: every step would start on $gpu"
    exit 0
fi

probe_gpu
[[ -n "$gpu" ]] || no_gpu
slug="$(echo "$gpu" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9' '-' | sed 's/-\+/-/g; s/^-//; s/-$//')"
out_dir="${out_dir:-benchmarks/results/$(date -u +%Y%m%d-%H%M)-$slug}"
mkdir -p "$out_dir"
steps="$out_dir/steps.tsv"
printf "step\tstatus\tseconds\tlog\n" > "$steps"
echo "device suite on $gpu, budget ${budget}s, results in $out_dir"
"$PYTHON" - > "$out_dir/environment.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0), "cc", torch.cuda.get_device_capability(0))
for name in ("triton", "peft", "transformers", "tqdm", "matplotlib", "pytest", "scipy", "safetensors", "cupy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
EOF

any_failed=0
run_step() {  # name, cap seconds, command...
    local name="$1" cap="$2"; shift 2
    local left=$(( budget - (SECONDS - start_s) - 15 ))
    local limit=$(( cap < left ? cap : left ))
    local log="$out_dir/$name.log" t0=$SECONDS status
    if (( limit < 20 )); then
        printf "%s\tskipped (budget spent)\t0\t-\n" "$name" >> "$steps"
        echo "[$name] skipped: the ${budget}s budget is spent"
        return
    fi
    echo "[$name] (<= ${limit}s) $*"
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    if (( rc == 0 )); then status=ok
    elif (( rc == 124 || rc == 137 )); then status="timed out after ${limit}s"; any_failed=1
    else status="failed (rc=$rc)"; any_failed=1
    fi
    printf "%s\t%s\t%d\t%s\n" "$name" "$status" $(( SECONDS - t0 )) "$log" >> "$steps"
    echo "[$name] $status in $(( SECONDS - t0 ))s; tail of $log:"
    tail -n 4 "$log" | sed 's/^/    /'
}

run_step build 180 env QRLORA_CUDA_ARCHS=90 MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace
run_step gpu-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
read -r -a cuda_tests <<< "$(test_files)"
if (( ${#cuda_tests[@]} )); then
    run_step cuda-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda "${cuda_tests[@]}"
fi
# Layer cases stop starting after 100 s (the rest are reported "not run"); the model level follows.
run_step bench 170 "$PYTHON" -m benchmarks.throughput --quick --no-qr --time-budget 100 --out "$out_dir"
run_step qr 60 "$PYTHON" -m benchmarks.throughput --only qr --qr-sizes 4096x4096 --out "$out_dir"
run_step init 60 "$PYTHON" -m benchmarks.init_time --shapes llama7b --layers 2 --rules rank,frobenius,frobenius-randomized \
    --no-scipy --reps 1 --out "$out_dir"

echo
column -t -s $'\t' "$steps" 2>/dev/null || cat "$steps"
echo
echo "== device suite: $gpu, $(( SECONDS - start_s ))s, results in $out_dir =="
"$PYTHON" -m benchmarks.throughput --summary "$out_dir" 2>&1 | tee "$out_dir/summary.txt"
exit $any_failed
