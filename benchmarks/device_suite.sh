#!/usr/bin/env bash
# The one-command GPU suite, for a fresh GPU machine with the repository copied in (not pip-installed),
# no internet and nothing installable (the target image: Python 3.12 as python3, torch 2.11+cu130, triton 3.6).
#
#   benchmarks/device_suite.sh [--dry-run] [--budget SECONDS] [--out DIR] [--archive FILE] [--only STEP,...]
#                              [--allow-cpu]
#
# Within the budget (default 570 s), in this order, each step time-boxed to min(its cap + the time earlier steps
# left of theirs, time left); the most important measurements first (the benchmarks' own --time-budget follows
# that allowance, up to 90 s for the QR one and 30 s for init, so a quick build leaves the layer benchmark more
# time). The caps sum to 555 s:
#   1. build       150 s  the extension for sm_90 only: QRLORA_CUDA_ARCHS=90 python3 setup.py build_ext --inplace
#   2. qrcp-tests   60 s  the first real CUDA run of the pivoted QR, in its own process, CUDA_LAUNCH_BLOCKING=1:
#                         python3 -m pytest -v --tb=short --maxfail=10 -k "cuda or gpu" tests/test_qrcp.py
#   3. qr           75 s  the QR benchmark at 4096^2 fp32 (baselines first; the issue's ratio bars):
#                         python3 -m benchmarks.qr --sizes 4096 --out-dir DIR
#   4. init         45 s  converting 2 of Llama-2-7B's 32 layers, bf16, rules diag, frobenius, rank=8; the
#                         whole-model time is extrapolated (labelled) against the 30 s / 5 s bars
#   5. bench       150 s  layer throughput, bf16, r=16, T 2048/8192, fwd and fwd+bwd: llama-7b's shapes first, then
#                         roberta-base's; frozen nn.Linear, QR-LoRA (Triton), PEFT LoRA, and 1,000 adapters
#                         mixed in one batch on 4096x4096 (results rewritten after every case group)
#   6. cuda-tests   75 s  the kernel / op / layer CUDA tests with QRLORA_AUTOTUNE=0 (one config per kernel),
#                         every test named cuda or marked gpu once: python3 -m pytest -v --tb=short --maxfail=10
#                         (-n 8 where pytest-xdist is installed: the Triton compiles run in parallel)
# After the build, a CPU-only extension (setup.py found no toolkit) is reported and the QR steps are skipped: their
# numbers would be CPU numbers under the GPU's name.
# The tests run with -v (a killed step's log still shows every test that finished) and PYTHONUNBUFFERED=1.
#
# Results: every log, JSON, CSV and PNG, steps.tsv and summary.txt go to ONE folder (--out, default
# benchmarks/results/<date>-<gpu>/). After EVERY step that folder is re-archived, atomically, into one tarball:
# --archive, else $QRLORA_SUITE_ARCHIVE, else $OUT/device_suite.tgz when $OUT is set (none otherwise); beside it
# go copies of summary.txt and steps.tsv. The summary (per step status; layer, QR and initialisation results with
# the issue's bars) is printed last.
#
# --only runs the named steps (comma-separated; also "summary" for none but the summary); --allow-cpu runs them
# without a GPU (to test the suite itself: the numbers are then CPU numbers). Without a GPU and without
# --allow-cpu it stops at once: exit 3, "no CUDA GPU". --dry-run checks that every step's command would start
# (interpreter, setup.py, pytest, the benchmark modules, a writable results folder and archive) without running
# them, then checks the GPU the same way (exit 2 if a command would not start, 3 if there is no GPU).
# $PYTHON overrides the interpreter (default python3).
set -uo pipefail

all_steps="build qrcp-tests qr init bench cuda-tests"
declare -A cap=([build]=150 [qrcp-tests]=60 [qr]=75 [init]=45 [bench]=150 [cuda-tests]=75)

dry_run=0
allow_cpu=0
budget="${QRLORA_SUITE_BUDGET_S:-570}"
out_dir=""
archive="${QRLORA_SUITE_ARCHIVE:-${OUT:+$OUT/device_suite.tgz}}"
only=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --allow-cpu) allow_cpu=1; shift ;;
        --budget) budget="${2:-}"; shift 2 ;;
        --out) out_dir="${2:-}"; shift 2 ;;
        --archive) archive="${2:-}"; shift 2 ;;
        --only) only="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$budget" =~ ^[0-9]+$ ]] || (( budget < 60 )); then
    echo "device_suite.sh: --budget must be a whole number of seconds >= 60, got '$budget'" >&2
    exit 2
fi
steps_to_run="$all_steps"
if [[ -n "$only" ]]; then
    steps_to_run=""
    for s in ${only//,/ }; do
        if [[ " $all_steps summary " != *" $s "* ]]; then
            echo "device_suite.sh: --only: unknown step '$s'; steps: $all_steps summary" >&2
            exit 2
        fi
        [[ "$s" != summary ]] && steps_to_run+=" $s"
    done
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# A step killed by its time box must still leave its log: Python buffers output to files otherwise.
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
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
# Every CUDA test once: the ones named cuda (the device fixture's [cuda] cases) and the gpu-marked ones
# (-k also matches marker names). test_qrcp.py has its own step; the CUDA emulation tests are CPU tests.
# test_kernels.py last: its ~200 CUDA cases each JIT-compile their own specialisation (the few GPU tests of the
# other files must not wait behind them); they run in parallel processes where pytest-xdist is installed.
cuda_test_files() {
    local f files=()
    for f in tests/test_functional.py tests/test_layer.py tests/test_model.py tests/test_adapter_io.py \
             tests/test_ops.py tests/test_kernels.py; do
        [[ -f "$f" ]] && files+=("$f")
    done
    echo "${files[@]}"
}
pytest_cmd=("$PYTHON" -m pytest -v --tb=short --maxfail=10 -p no:cacheprovider)

if (( dry_run )); then
    failed=0
    check() {  # name, command...: does the step's command start?
        local name="$1"; shift
        if "$@" >/dev/null 2>&1; then echo "ok    $name: $*"; else echo "FAIL  $name: $* would not start" >&2; failed=1; fi
    }
    check timeout timeout 5 true
    check tar tar --version
    check build "$PYTHON" setup.py --name
    check qrcp-tests "${pytest_cmd[@]}" --collect-only -q tests/test_qrcp.py
    check qr "$PYTHON" -m benchmarks.qr --help
    check init "$PYTHON" -m benchmarks.init_time --help
    check bench "$PYTHON" -m benchmarks.throughput --help
    check cuda-tests test -n "$(cuda_test_files)"
    check summary "$PYTHON" -c "import triton, benchmarks.qr; from benchmarks.throughput import summarize"
    check autotune-knob "$PYTHON" -c "import os, sys; os.environ['QRLORA_AUTOTUNE'] = '0'; from qrlora_kernels.kernels import utils; sys.exit(utils.AUTOTUNE)"
    echo "ok    env: PYTHON=$PYTHON PYTHONUNBUFFERED=$PYTHONUNBUFFERED"
    # The folder the results would go to: --out (made now, as the run would), else a new one under
    # benchmarks/results.
    results_parent="${out_dir:-$repo/benchmarks/results}"
    probe="$(mkdir -p "$results_parent" 2>/dev/null && mktemp -d "$results_parent/.dry-run.XXXXXX" 2>/dev/null)" \
        && rmdir "$probe"
    check "results-folder ($results_parent)" test -n "$probe"
    if [[ -n "$archive" ]]; then
        check archive bash -c 'mkdir -p "$(dirname "$1")" && touch "$1.probe" && rm -f "$1.probe"' _ "$archive"
    else
        echo "note  archive: none (neither --archive, QRLORA_SUITE_ARCHIVE nor OUT is set)"
    fi
    (( failed )) && { echo "device_suite.sh: dry run: a step's command would not start (see FAIL above)" >&2; exit 2; }
    probe_gpu
    [[ -n "$gpu" ]] || { (( allow_cpu )) && { echo "dry run: every step would start (on the CPU: --allow-cpu)"; exit 0; }; no_gpu; }
    echo "dry run: every step would start on $gpu"
    exit 0
fi

probe_gpu
if [[ -z "$gpu" ]]; then
    (( allow_cpu )) || no_gpu
    gpu="cpu (--allow-cpu)"
fi
slug="$(echo "$gpu" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9' '-' | sed 's/-\+/-/g; s/^-//; s/-$//')"
out_dir="${out_dir:-benchmarks/results/$(date -u +%Y%m%d-%H%M)-$slug}"
# A folder that cannot be made (a file in the way, no permission) stops the run here: nothing is measured, and
# nothing is written anywhere else.
if ! mkdir -p "$out_dir" 2>/dev/null || ! out_dir="$(cd "$out_dir" && pwd)" || [[ ! -w "$out_dir" ]]; then
    echo "device_suite.sh: cannot write the results folder '$out_dir' (--out)" >&2
    exit 2
fi
suite_log="$out_dir/suite.log"
say() { echo "$@" | tee -a "$suite_log"; }
steps="$out_dir/steps.tsv"
printf "step\tstatus\tseconds\tcap\tlog\n" > "$steps"
say "device suite on $gpu, budget ${budget}s, steps:${steps_to_run}, results in $out_dir${archive:+, archived to $archive}"
"$PYTHON" - > "$out_dir/environment.txt" 2>&1 <<'EOF'
import importlib, os, platform, subprocess, sys, torch
print("command", " ".join(sys.argv), "python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "cc", torch.cuda.get_device_capability(0))
for name in ("triton", "peft", "transformers", "tqdm", "matplotlib", "pytest", "scipy", "safetensors", "cupy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
try:
    print(subprocess.run(["git", "log", "-1", "--format=commit %H %s"], capture_output=True, text=True).stdout.strip())
except OSError:
    pass
EOF

archive_results() {  # the whole results folder into one tarball (atomically), plus the small text files beside it
    [[ -n "$archive" ]] || return 0
    mkdir -p "$(dirname "$archive")"
    tar -czf "$archive.tmp" -C "$out_dir" . && mv -f "$archive.tmp" "$archive"
    local f dir
    dir="$(dirname "$archive")"
    for f in summary.txt steps.tsv; do
        [[ -f "$out_dir/$f" ]] && cp -f "$out_dir/$f" "$dir/$f.tmp" && mv -f "$dir/$f.tmp" "$dir/$f"
    done
    return 0
}
write_summary() {  # steps and results so far -> summary.txt
    {
        echo "== device suite: $gpu, $(( SECONDS - start_s ))s of ${budget}s, results in $out_dir =="
        column -t -s $'\t' "$steps" 2>/dev/null || cat "$steps"
        echo
        timeout 60 "$PYTHON" -m benchmarks.throughput --summary "$out_dir" 2>&1
    } > "$out_dir/summary.txt.tmp" && mv -f "$out_dir/summary.txt.tmp" "$out_dir/summary.txt"
}

any_failed=0
banked=0  # seconds earlier steps left of their caps: the next steps may use them
allowance() {  # name -> the seconds that step may take now: its cap plus the banked time, within the budget
    local reserve=20  # the summary and the last archive
    local left=$(( budget - (SECONDS - start_s) - reserve ))
    local want=$(( cap[$1] + banked ))
    echo $(( want < left ? want : left ))
}
inner_budget() {  # name, margin, most -> a benchmark's own --time-budget: its allowance less the margin it needs to
    local a b      # finish, at most `most` (the QR and init steps need little more than their caps: the layer
    a="$(allowance "$1")"  # benchmark, which can use any time, gets the rest)
    b=$(( a - $2 < $3 ? a - $2 : $3 ))
    echo $(( b > 10 ? b : 10 ))
}
run_step() {  # name, command...   (cap from the table above)
    local name="$1"; shift
    [[ " $steps_to_run " == *" $name "* ]] || return 0
    local limit
    limit="$(allowance "$name")"
    local log="$out_dir/$name.log" t0=$SECONDS status
    if (( limit < 15 )); then
        printf "%s\tskipped (budget spent)\t0\t%d\t-\n" "$name" "${cap[$name]}" >> "$steps"
        say "[$name] skipped: the ${budget}s budget is spent"
        archive_results
        return
    fi
    say "[$name] (<= ${limit}s) $*"
    # --kill-after: the kill follows 5 s after the TERM, so a step ends by limit + 5 s.
    timeout --kill-after=5 "$(( limit - 5 ))" "$@" > "$log" 2>&1
    local rc=$?
    if (( rc == 0 )); then status=ok
    elif (( rc == 124 || rc == 137 )); then status="timed out after ${limit}s"; any_failed=1
    else status="failed (rc=$rc)"; any_failed=1
    fi
    printf "%s\t%s\t%d\t%d\t%s\n" "$name" "$status" $(( SECONDS - t0 )) "${cap[$name]}" "$(basename "$log")" >> "$steps"
    banked=$(( limit - (SECONDS - t0) > 0 ? limit - (SECONDS - t0) : 0 ))
    say "[$name] $status in $(( SECONDS - t0 ))s; tail of $log:"
    tail -n 6 "$log" | sed 's/^/    /' | tee -a "$suite_log"
    [[ "$name" == bench ]] && write_summary  # in case the last step overruns the call
    archive_results
}

run_step build env QRLORA_CUDA_ARCHS=90 MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace
# setup.py falls back to a CPU-only build where it finds no toolkit (and an earlier build may be one): every QR
# number would then be a CPU number under the GPU's name. Said, and the QR steps skipped, unless --allow-cpu.
if [[ " $steps_to_run " == *" qrcp-tests "* || " $steps_to_run " == *" qr "* || " $steps_to_run " == *" init "* ]] \
        && (( ! allow_cpu )); then
    kind="$("$PYTHON" -c "import qrlora_kernels; print(qrlora_kernels.build_info()['kind'])" 2>&1 | tail -n 1)"
    if [[ "$kind" != cuda ]]; then
        say "[build] the extension is not a CUDA build (build_info kind: $kind; see build.log): the QR steps are skipped"
        printf "build-kind\tnot cuda (%s)\t0\t0\t-\n" "$kind" >> "$steps"
        kept=""
        for s in $steps_to_run; do [[ " qrcp-tests qr init " == *" $s "* ]] || kept+=" $s"; done
        steps_to_run="$kept"
        any_failed=1
    fi
fi
run_step qrcp-tests env CUDA_LAUNCH_BLOCKING=1 QRLORA_AUTOTUNE=0 "${pytest_cmd[@]}" -k "cuda or gpu" tests/test_qrcp.py
run_step qr "$PYTHON" -m benchmarks.qr --sizes 4096 --reps 10 --routine-budget 4 --time-budget "$(inner_budget qr 20 90)" \
    --out-dir "$out_dir"
run_step init "$PYTHON" -m benchmarks.init_time --shapes llama7b --layers 2 --rules diag,frobenius,rank \
    --no-scipy --reps 1 --time-budget "$(inner_budget init 15 30)" --out "$out_dir"
run_step bench "$PYTHON" -m benchmarks.throughput --preset llama-7b,roberta-base --tokens 2048,8192 --ranks 16 \
    --dtype bf16 --modes fwd,fwd+bwd --providers frozen_linear,qrlora_triton,peft_lora,qrlora_triton_multi1000 \
    --multi-shapes 4096x4096 --model-level off --no-qr --time-budget "$(inner_budget bench 30 600)" --out "$out_dir"
read -r -a cuda_tests <<< "$(cuda_test_files)"
parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
# (${a[@]+"${a[@]}"}: an empty array is "unbound" under set -u before bash 4.4)
run_step cuda-tests env QRLORA_AUTOTUNE=0 "${pytest_cmd[@]}" ${parallel[@]+"${parallel[@]}"} -k "cuda or gpu" "${cuda_tests[@]}"

write_summary
archive_results
echo
cat "$out_dir/summary.txt"
exit $any_failed
