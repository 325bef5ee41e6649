"""Compile every kernel variant for sm_80 and sm_90 without a GPU: ``python -m qrlora_kernels.kernels.aot_check``.

The interpreter never runs Triton's GPU compiler, so a kernel can pass every CPU test and still fail to compile
for a real GPU (layouts, shared memory, type rules). This builds each variant ahead of time for the target
architectures (Triton ships its own LLVM and ptxas) and prints the shared memory each config needs; configs
over a GPU's shared-memory limit are expected (the autotuner skips them on that GPU).
Needs ``TRITON_INTERPRET`` unset. ``--all`` compiles every autotune config, not just the first (minutes).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import utils

_POINTER_TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _module(name):
    # ``kernels.lowrank_matmul`` is also the re-exported function, so go through the module path.
    return importlib.import_module(f"{__package__}.{name}")


def compile_kernel(autotuned, constexprs: dict, pointer_types: dict, config, capability: int) -> int:
    """Compile one variant for ``sm_<capability>``; returns the shared memory it needs, in bytes."""
    jit = autotuned.fn
    constexprs = dict(constexprs, **config.kwargs)
    signature = {}
    for name in jit.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        else:
            signature[name] = "i32"
    source = ASTSource(fn=jit, signature=signature,
                       constexprs={(jit.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return compiled.metadata.shared


def variants(dtypes, all_configs: bool):
    """(label, autotuned kernel, constexprs, pointer types, configs) for every kernel variant."""
    lowrank = _module("lowrank_matmul")._lowrank_matmul_kernel
    merged = _module("merged_weight")._merged_weight_kernel
    project = _module("projection")._project_kernel
    gemm = utils._GPU_GEMM_CONFIGS if all_configs else utils._GPU_GEMM_CONFIGS[:1]
    proj = utils._GPU_PROJECT_CONFIGS if all_configs else utils._GPU_PROJECT_CONFIGS[:1]
    tma = utils._GPU_TMA_CONFIGS if all_configs else utils._GPU_TMA_CONFIGS[:1]
    lowrank_configs = [utils._tiled(c) for c in gemm] + tma
    for dtype in dtypes:
        ptr = _POINTER_TYPES[dtype]
        common = dict(INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee", ACC_DTYPE=tl.float32)
        # The forward GEMM reads W0^T (K-major b), the dx GEMM W0 (row-major b).
        for has_lowrank, has_bias, per_token, k_major in ((True, True, False, True), (True, False, True, False),
                                                          (False, False, False, False)):
            yield (f"lowrank_matmul {dtype} lowrank={has_lowrank} bias={has_bias} per_token={per_token} "
                   f"b_k_major={k_major}", lowrank,
                   dict(common, HAS_MATMUL=True, HAS_LOWRANK=has_lowrank, HAS_BIAS=has_bias,
                        PER_TOKEN_LAM=per_token, B_K_MAJOR=k_major),
                   dict(a_ptr=ptr, b_ptr=ptr, c_ptr=ptr, p_ptr="*fp32", lam_ptr="*fp32", lam_index_ptr="*i64",
                        u_ptr=ptr, bias_ptr=ptr, out_ptr=ptr if has_lowrank else "*fp32"), lowrank_configs)
        # lowrank_update (a Q-only layer's update of the frozen output): no GEMM, no TMA.
        for has_bias, per_token in ((True, False), (False, True)):
            yield (f"lowrank_update {dtype} bias={has_bias} per_token={per_token}", lowrank,
                   dict(common, HAS_MATMUL=False, HAS_LOWRANK=True, HAS_BIAS=has_bias, PER_TOKEN_LAM=per_token,
                        B_K_MAJOR=False),
                   dict(a_ptr=ptr, b_ptr=ptr, c_ptr=ptr, p_ptr="*fp32", lam_ptr="*fp32", lam_index_ptr="*i64",
                        u_ptr=ptr, bias_ptr=ptr, out_ptr=ptr), [utils._tiled(c) for c in gemm])
        yield (f"merged_weight {dtype}", merged, common,
               dict(w_ptr=ptr, q_ptr=ptr, lam_ptr="*fp32", r_ptr=ptr, out_ptr=ptr), gemm)
        for reduce in (0, 1, 2):
            yield (f"project {dtype} reduce={reduce}", project, dict(common, REDUCE=reduce),
                   dict(a_ptr=ptr, basis_ptr=ptr, s_ptr="*fp32", g_ptr="*fp32", partial_ptr="*fp32"), proj)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="input dtypes (default fp16,bf16,fp32)")
    parser.add_argument("--all", action="store_true", help="every autotune config, not only the first")
    args = parser.parse_args(argv)
    if utils.INTERPRETED:
        parser.error("unset TRITON_INTERPRET: the interpreter never runs the GPU compiler")
    capabilities = [int(c) for c in args.arch.split(",")]
    failures = 0
    start = time.perf_counter()
    for (label, kernel, constexprs, pointers, configs), capability in itertools.product(
            list(variants(args.dtypes.split(","), args.all)), capabilities):
        for config in configs:
            if config.kwargs.get("USE_TMA") and capability < 90:
                continue  # TMA configs are offered on sm_90 only (utils.tma_operands)
            tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            tiles += " persistent tma" if config.kwargs.get("USE_TMA") else ""
            where = f"sm_{capability} {label} tiles {tiles} stages {config.num_stages} warps {config.num_warps}"
            try:
                shared = compile_kernel(kernel, constexprs, pointers, config, capability)
            except Exception as exc:  # report every failure, then fail once at the end
                failures += 1
                print(f"FAIL {where}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            else:
                print(f"ok   {where}: shared memory {shared} B", flush=True)
    print(f"{failures} failure(s) in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
