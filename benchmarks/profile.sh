#!/usr/bin/env bash
# Profile one benchmark case with Nsight Systems or Nsight Compute.
#
#   benchmarks/profile.sh [--tool auto|nsys|ncu] [--out DIR] CASE
#
# --tool auto (the default) takes nsys when it is on PATH, else ncu. (On this project's GPU machines nsys is not
# on PATH and the copy inside Nsight Compute could not make a report: use ncu there.) $PYTHON overrides the
# interpreter (default python3).
#
# CASE is what `python -m benchmarks.throughput --case` takes, e.g.
#   shape=4096x4096,tokens=2048,rank=64,provider=qrlora_triton,mode=fwd+bwd
# The case runs a few warm-up steps (compilation, autotuning), then its timed iterations inside a
# cudaProfilerStart/Stop window, each in an NVTX range "bench/<provider>/<shape>/T../r../<mode>/iterN";
# the kernels add their own ranges around every launch ("qrlora/project", "qrlora/project_and_reduce",
# "qrlora/lowrank_matmul", "qrlora/merged_weight", "qrlora/dlam_via_weight_grad").
#
#   nsys: `nsys profile --capture-range=cudaProfilerApi --trace=cuda,nvtx,osrt` -> DIR/<name>.nsys-rep,
#         plus `nsys stats` kernel and NVTX summaries printed at the end.
#   ncu:  `ncu --clock-control none --profile-from-start off --nvtx --set full` -> DIR/<name>.ncu-rep.
#         --clock-control none keeps the GPU's own boost clocks, so durations match do_bench timings.
#
# Fails fast, with a clear message and a non-zero status, when the tool or the GPU is missing.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

tool=auto
out_dir=""
case_spec=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tool) tool="${2:-}"; shift 2 ;;
        --tool=*) tool="${1#--tool=}"; shift ;;
        --out) out_dir="${2:-}"; shift 2 ;;
        --out=*) out_dir="${1#--out=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "profile.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) if [[ -n "$case_spec" ]]; then echo "profile.sh: one CASE only, got '$case_spec' and '$1'" >&2; exit 2; fi
           case_spec="$1"; shift ;;
    esac
done

if [[ -z "$case_spec" ]]; then
    echo "profile.sh: missing CASE, e.g. shape=4096x4096,tokens=2048,rank=64,provider=qrlora_triton,mode=fwd+bwd" >&2
    exit 2
fi
if [[ "$tool" != auto && "$tool" != nsys && "$tool" != ncu ]]; then
    echo "profile.sh: --tool must be auto, nsys or ncu, got '$tool'" >&2
    exit 2
fi
if [[ "$tool" == auto ]]; then
    if command -v nsys >/dev/null 2>&1; then tool=nsys
    elif command -v ncu >/dev/null 2>&1; then tool=ncu
    else
        echo "profile.sh: neither nsys (NVIDIA Nsight Systems) nor ncu (NVIDIA Nsight Compute) is on PATH: install one, or add its bin/ to PATH, or name it with --tool" >&2
        exit 3
    fi
    echo "profile.sh: using $tool (--tool auto)" >&2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
PYTHON="${PYTHON:-python3}"

if ! command -v "$tool" >/dev/null 2>&1; then
    if [[ "$tool" == nsys ]]; then
        echo "profile.sh: nsys not found on PATH: install NVIDIA Nsight Systems (or add its bin/ to PATH)" >&2
    else
        echo "profile.sh: ncu not found on PATH: install NVIDIA Nsight Compute (or add its bin/ to PATH)" >&2
    fi
    exit 3
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "profile.sh: no CUDA GPU visible to torch: Nsight profiles GPU kernels, so there is nothing to profile here" >&2
    exit 4
fi
# Check the case before paying for a profiler start-up.
"$PYTHON" -c "import sys; from benchmarks.throughput import parse_case; parse_case(sys.argv[1])" "$case_spec"

out_dir="${out_dir:-benchmarks/results/profiles}"
mkdir -p "$out_dir"
name="$(echo "$case_spec" | tr -c 'A-Za-z0-9=_.-' '_' | sed 's/_*$//')-$(date -u +%Y%m%dT%H%M%S)"
cmd=("$PYTHON" -m benchmarks.throughput --case "$case_spec")

if [[ "$tool" == nsys ]]; then
    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop --trace=cuda,nvtx,osrt \
        --force-overwrite=true -o "$out_dir/$name" "${cmd[@]}"
    echo "== kernel summary =="
    nsys stats --report cuda_gpu_kern_sum --format table "$out_dir/$name.nsys-rep" || true
    echo "== NVTX ranges =="
    nsys stats --report nvtx_sum --format table "$out_dir/$name.nsys-rep" || true
    echo "report: $out_dir/$name.nsys-rep (open with nsys-ui)"
else
    ncu --clock-control none --profile-from-start off --nvtx --set full -f -o "$out_dir/$name" "${cmd[@]}"
    echo "report: $out_dir/$name.ncu-rep (open with ncu-ui, or: ncu --import $out_dir/$name.ncu-rep --page details)"
fi
