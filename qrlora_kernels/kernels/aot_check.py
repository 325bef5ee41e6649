"""Compile every kernel variant for sm_80 and sm_90 without a GPU: ``python -m qrlora_kernels.kernels.aot_check``.

The interpreter never runs Triton's GPU compiler, so a kernel can pass every CPU test and still fail to compile
for a real GPU (layouts, shared memory, type rules). This builds each variant ahead of time for the target
architectures (Triton ships its own LLVM, ptxas and cuobjdump) and prints, per config, the shared memory it needs,
the registers per thread and the stack frame (register spills: local-memory traffic inside a GEMM's loops).
Configs over a GPU's shared-memory limit are expected (the autotuner skips them on that GPU).

Each variant is compiled as Triton's launcher would specialise it for a representative launch (``TOKENS``,
``IN``, ``OUT``, ``RANK``: a 4096 x 4096 layer, 4096 tokens, rank 200, the tensors as ``QRLoraLinear`` passes
them): integer arguments equal to 1 become constants and multiples of 16 are marked divisible, which decides how
loads vectorise and so how many registers a tile needs. ``tests/test_kernels.py`` checks these values against
the layer's real launches.
Needs ``TRITON_INTERPRET`` unset. ``--all`` compiles every autotune config, not just the first (minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import utils

_POINTER_TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}

# The representative launch: tokens, in_features, out_features and rank (tau's ranks are rarely a multiple of 16).
TOKENS, IN, OUT, RANK = 4096, 4096, 4096, 200
_DO_NOT_SPECIALIZE = ("NUM_SMS", "TMA_OK")  # as in the kernels' @triton.jit(do_not_specialize=...)


def _module(name):
    # ``kernels.lowrank_matmul`` is also the re-exported function, so go through the module path.
    return importlib.import_module(f"{__package__}.{name}")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    kernel: object  # the autotuned kernel
    constexprs: dict
    pointer_types: dict
    configs: list
    ints: dict  # the integer arguments of the representative launch


@dataclasses.dataclass(frozen=True)
class Build:
    shared: int  # bytes of shared memory
    registers: int | None  # per thread; None where this Triton ships no cuobjdump
    stack: int | None  # bytes of stack frame per thread: register spills


def unsupported_reason() -> str | None:
    """Why this Triton cannot run the check (it reads the launcher's specialisation from Triton's internals, which
    Triton 3.6 and 3.8 have and 3.2 to 3.5 have not), or None."""
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        return (f"aot_check needs triton._C.libtriton.native_specialize_impl (Triton 3.6 and 3.8 have it), "
                f"which Triton {triton.__version__} lacks")
    return None


def specialisation(value: int, name: str):
    """How Triton's launcher specialises an integer argument: ("constexpr", 1), (type, "D") when divisible by 16,
    or (type, "")."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    return tuple(native_specialize_impl(CUDABackend, value, False, name not in _DO_NOT_SPECIALIZE, True))


def _signature(jit, constexprs: dict, pointer_types: dict, ints: dict):
    """(signature, constexprs, attrs) for ASTSource, specialised as a launch with ``ints`` would be. Every pointer
    is taken as 16-byte aligned (torch's allocations are)."""
    signature, constexprs, attrs = {}, dict(constexprs), {}
    divisible = [["tt.divisibility", 16]]
    for index, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
            attrs[(index,)] = divisible
        else:
            kind, key = specialisation(ints[name], name)
            if kind == "constexpr":
                signature[name] = "constexpr"
                constexprs[name] = key
            else:
                signature[name] = kind
                if key == "D":
                    attrs[(index,)] = divisible
    return signature, {(jit.arg_names.index(k),): v for k, v in constexprs.items()}, attrs


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump, or None where this Triton ships none (then no registers are reported)."""
    try:
        path = triton.knobs.nvidia.cuobjdump.path
    except Exception:  # a Triton without this knob or without the binary
        return None
    return path if path and os.path.exists(path) else None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack frame bytes) of a compiled kernel, from cuobjdump's resource report."""
    tool = cuobjdump_path()
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                                check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump's report has no REG/STACK line: {report[-500:]}")
    return int(found.group(1)), int(found.group(2))


def compile_kernel(variant: Variant, config, capability: int) -> Build:
    """Compile one config of ``variant`` for ``sm_<capability>``."""
    jit = variant.kernel.fn
    signature, constexprs, attrs = _signature(jit, dict(variant.constexprs, **config.kwargs), variant.pointer_types,
                                              variant.ints)
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages,
                                           **utils.COMPILE_OPTIONS))
    registers, stack = resource_usage(compiled.asm["cubin"])
    return Build(compiled.metadata.shared, registers, stack)


def _row_major(rows: int, cols: int) -> tuple[int, int]:
    return cols, 1


def _lowrank_ints(has_matmul: bool, has_lowrank: bool, has_bias: bool, per_token: bool, forward: bool) -> dict:
    """``lowrank_matmul._launch``'s integers. Forward: a = x (T, IN), b = W0^T (K-major), p = S (T, r),
    u = Q^T (r, OUT; column stride r), c and out (T, OUT). Backward (dx): a = dY (T, OUT), b = W0 (row-major),
    p = G, u = R (r, IN), out (T, IN). lowrank_update: c = Y0 or dY (T, OUT), u = Q^T. Arguments a launch does not
    use get ``out``'s strides, as ``_launch`` passes them."""
    n = OUT if (forward or not has_matmul) else IN
    k = (IN if forward else OUT) if has_matmul else 0
    out = _row_major(TOKENS, n)
    a = _row_major(TOKENS, k) if has_matmul else out
    b = ((1, IN) if forward else _row_major(OUT, IN)) if has_matmul else out
    p = _row_major(TOKENS, RANK) if has_lowrank else out
    lam = ((RANK, 1) if per_token else (0, 1)) if has_lowrank else out
    u = ((1, RANK) if forward or not has_matmul else _row_major(RANK, IN)) if has_lowrank else out
    return dict(M=TOKENS, N=n, K=k, R=RANK if has_lowrank else 0, M_BUCKET=utils.token_bucket(TOKENS), NUM_SMS=132,
                TMA_OK=0, stride_am=a[0], stride_ak=a[1], stride_bk=b[0], stride_bn=b[1],
                stride_cm=out[0], stride_cn=out[1], stride_pm=p[0], stride_pr=p[1], stride_la=lam[0],
                stride_lr=lam[1], stride_ur=u[0], stride_un=u[1], stride_bias=1 if has_bias else 0,
                stride_om=out[0], stride_on=out[1])


def _merged_ints() -> dict:
    """``merged_weight``'s integers: W0 (OUT, IN), Q (OUT, r), lam (r,), R (r, IN), W_eff (OUT, IN)."""
    return dict(N=OUT, K=IN, R=RANK, stride_wn=IN, stride_wk=1, stride_qn=RANK, stride_qr=1, stride_lr=1,
                stride_rr=IN, stride_rk=1, stride_on=IN, stride_ok=1)


def _project_ints(reduce: int, basis: str) -> dict:
    """``projection._launch``'s integers. Forward, reduce 0: S = x R^T (a = x (T, IN), basis = R^T, a transposed
    view) or, on a Q-only layer, S = Y0 Q (a = Y0 (T, OUT), basis = Q (OUT, r)); g stands in for s and the partial
    sums. Backward, reduce 1/2: G = dY Q with s = S (T, r), into per-block sums (blocks, r) or per-token products
    (T, r). Every (T, r) or (blocks, r) buffer is row-major."""
    k = IN if basis == "R^T" else OUT
    basis_strides = (1, IN) if basis == "R^T" else _row_major(OUT, RANK)
    rank_rows = _row_major(TOKENS, RANK)
    return dict(M=TOKENS, R=RANK, K=k, M_BUCKET=utils.token_bucket(TOKENS), stride_am=k, stride_ak=1,
                stride_bk=basis_strides[0], stride_br=basis_strides[1], stride_sm=rank_rows[0],
                stride_sr=rank_rows[1], stride_gm=rank_rows[0], stride_gr=rank_rows[1], stride_pm=rank_rows[0],
                stride_pr=rank_rows[1])


def variants(dtypes, all_configs: bool):
    """Every kernel variant, as ``Variant``s: the launches ``QRLoraLinear`` makes, per input dtype."""
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
        lowrank_pointers = dict(a_ptr=ptr, b_ptr=ptr, c_ptr=ptr, p_ptr="*fp32", lam_ptr="*fp32",
                                lam_index_ptr="*i64", u_ptr=ptr, bias_ptr=ptr, out_ptr=ptr)
        # The forward GEMM reads W0^T (K-major b), the dx GEMM W0 (row-major b); the last is the plain matmul.
        for has_lowrank, has_bias, per_token, k_major in ((True, True, False, True), (True, False, True, False),
                                                          (False, False, False, False)):
            yield Variant(f"lowrank_matmul {dtype} lowrank={has_lowrank} bias={has_bias} per_token={per_token} "
                          f"b_k_major={k_major}", lowrank,
                          dict(common, HAS_MATMUL=True, HAS_LOWRANK=has_lowrank, HAS_BIAS=has_bias,
                               PER_TOKEN_LAM=per_token, B_K_MAJOR=k_major),
                          dict(lowrank_pointers, out_ptr=ptr if has_lowrank else "*fp32"), lowrank_configs,
                          _lowrank_ints(True, has_lowrank, has_bias, per_token, forward=k_major))
        # lowrank_update (a Q-only layer's update of the frozen output): no GEMM, no TMA.
        for has_bias, per_token in ((True, False), (False, True)):
            yield Variant(f"lowrank_update {dtype} bias={has_bias} per_token={per_token}", lowrank,
                          dict(common, HAS_MATMUL=False, HAS_LOWRANK=True, HAS_BIAS=has_bias,
                               PER_TOKEN_LAM=per_token, B_K_MAJOR=False),
                          lowrank_pointers, [utils._tiled(c) for c in gemm],
                          _lowrank_ints(False, True, has_bias, per_token, forward=False))
        yield Variant(f"merged_weight {dtype}", merged, common,
                      dict(w_ptr=ptr, q_ptr=ptr, lam_ptr="*fp32", r_ptr=ptr, out_ptr=ptr), gemm, _merged_ints())
        project_pointers = dict(a_ptr=ptr, basis_ptr=ptr, s_ptr="*fp32", g_ptr="*fp32", partial_ptr="*fp32")
        for reduce, basis in ((0, "R^T"), (0, "Q"), (1, "Q"), (2, "Q")):
            yield Variant(f"project {dtype} reduce={reduce} basis={basis}", project, dict(common, REDUCE=reduce),
                          project_pointers, proj, _project_ints(reduce, basis))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="input dtypes (default fp16,bf16,fp32)")
    parser.add_argument("--all", action="store_true", help="every autotune config, not only the first")
    args = parser.parse_args(argv)
    if utils.INTERPRETED:
        parser.error("unset TRITON_INTERPRET: the interpreter never runs the GPU compiler")
    reason = unsupported_reason()
    if reason:
        parser.error(reason)
    capabilities = [int(c) for c in args.arch.split(",")]
    failures = spilling = 0
    start = time.perf_counter()
    for variant, capability in itertools.product(list(variants(args.dtypes.split(","), args.all)), capabilities):
        for config in variant.configs:
            if config.kwargs.get("USE_TMA") and capability < 90:
                continue  # TMA configs are offered on sm_90 only (utils.tma_operands)
            tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            tiles += f" r-chunk {config.kwargs['BLOCK_R']}" if "BLOCK_R" in config.kwargs else ""
            tiles += " persistent tma" if config.kwargs.get("USE_TMA") else ""
            where = (f"sm_{capability} {variant.label} tiles {tiles} stages {config.num_stages} "
                     f"warps {config.num_warps}")
            try:
                build = compile_kernel(variant, config, capability)
            except Exception as exc:  # report every failure, then fail once at the end
                failures += 1
                print(f"FAIL {where}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                continue
            usage = "" if build.registers is None else f", {build.registers} registers, stack {build.stack} B"
            spilling += bool(build.stack)
            print(f"ok   {where}: shared memory {build.shared} B{usage}{' SPILLS' if build.stack else ''}",
                  flush=True)
    print(f"{failures} failure(s), {spilling} build(s) spilling registers, in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
