"""The CUDA back end of qrcp on a machine without a GPU: ``csrc/qrcp/panel_cuda.cu``, compiled as C++
with its CUDA built-ins emulated (``tests/cuda_emulation/cuda_emulation.h``: one fiber per CUDA thread,
real barriers and warp shuffles), under the one host driver, checked like the CPU back end.

The test extension (``torch.ops.qrlora_cuda_emulation.qrcp``) is built once per session from the same
sources as ``qrlora_kernels._C``, with every panel and norm recomputation sent to the CUDA kernels. The
emulated blocks are smaller than the GPU's (128/64 threads, still several warps each). A GPU session
runs the real kernels through tests/test_qrcp.py's ``cuda`` cases; this catches indexing, arithmetic
and barrier-structure errors in them without one.
"""
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from qrlora_kernels import qrcp
from qrlora_kernels.qr import _prepare, _result, _validate
from qr_checks import check_structure, dependent_columns, matrix_types, with_spectrum

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/qrcp/driver.cpp", "csrc/qrcp/randomized.cpp", "csrc/qrcp/form_q.cpp",
           "csrc/qrcp/fixed_order_blas.cpp", "tests/cuda_emulation/panel_cuda_emulated.cpp",
           "tests/cuda_emulation/bindings.cpp", "tests/cuda_emulation/probes.cpp"]


def _build(name, extra_defines=()):
    """Builds (once per session) and loads the test extension; returns qrcp over its ``name`` op namespace,
    with the same arguments and results as ``qrlora_kernels.qrcp``."""
    from torch.utils import cpp_extension

    build = ROOT / "build" / name
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(ROOT / s) for s in SOURCES],
                       extra_cflags=["-O2", "-fopenmp", "-DQRLORA_CUDA_EMULATION",
                                     f"-DQRLORA_EMULATION_NAMESPACE={name}", *extra_defines],
                       extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False,
                       verbose=False)
    op = getattr(torch.ops, name).qrcp

    def run(A, *, rank=None, tau=None, abstol=None, reltol=None, method="geqp3", mode="reduced",
            _block_size=None, _seed=None):
        _validate(A, rank, tau, abstol, reltol, method, mode)
        work, args = _prepare(A, rank, tau, abstol, reltol, method, mode, _block_size, _seed)
        return _result(mode, A.device, *op(work, *args))
    return run


@pytest.fixture(scope="module")
def emulated():
    """qrcp with the CUDA panel emulated, in blocks of 128/64/64 threads (fast)."""
    return _build("qrlora_cuda_emulation")


@pytest.fixture(scope="module")
def emulated_gpu_blocks():
    """The same with the GPU's own block sizes (1024/256/256 threads: 32 warps in the one-block kernels)."""
    return _build("qrlora_cuda_emulation_gpu_blocks", ["-DQRLORA_EMULATE_GPU_BLOCK_SIZES"])


def test_the_emulation_runs_barriers_right_and_reports_their_misuse(emulated):
    """The emulation itself: a correct block reduction over 3 blocks of 64 threads, and an error, not a
    silent pass or a hang, for each barrier misuse that is undefined on a GPU."""
    sums = torch.ops.qrlora_cuda_emulation.probe("block_sums")
    assert sums.tolist() == [sum(range(64))] * 3
    for name, message in [("different_syncthreads", "different __syncthreads"),
                          ("syncthreads_after_return", "after some threads of the block have returned"),
                          ("shuffle_after_return", "after some of its lanes returned"),
                          ("split_warp", "deadlock"),
                          ("empty_grid", "invalid configuration")]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.qrlora_cuda_emulation.probe(name)


def _same_factorisation(got, ref, dtype):
    """Pivots equal; R and Q equal to rounding (the CUDA kernels sum in another order than the CPU's)."""
    assert torch.equal(got.perm, ref.perm), f"pivots differ: {got.perm.tolist()} vs {ref.perm.tolist()}"
    assert got.R.shape == ref.R.shape and got.Q.shape == ref.Q.shape
    tol = 1e-11 if dtype == torch.float64 else 2e-4
    scale = ref.R.abs().max().item() or 1.0
    torch.testing.assert_close(got.R, ref.R, rtol=0, atol=tol * scale)
    torch.testing.assert_close(got.Q, ref.Q, rtol=0, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, block_size", [((1, 1), None), ((2, 3), None), ((5, 5), 1), ((10, 3), 3),
                                               ((3, 10), 3), ((50, 23), 20), ((23, 50), 20), ((37, 33), None)])
def test_emulated_cuda_panel_matches_the_cpu_panel(emulated, dtype, shape, block_size):
    A = torch.randn(*shape, dtype=dtype)
    got = emulated(A, _block_size=block_size)
    check_structure(A, got)
    _same_factorisation(got, qrcp(A, _block_size=block_size), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_cuda_panel_on_lapack_matrix_types(emulated, dtype):
    for name, A in matrix_types(24, 17, dtype).items():
        got = emulated(A, _block_size=5)
        try:
            check_structure(A, got)
        except AssertionError as exc:
            raise AssertionError(f"matrix type {name!r}: {exc}") from exc
        ref = qrcp(A, _block_size=5)
        # Exact ties (zero columns, equal norms) may be broken by rounding either way: compare |R_ii|.
        torch.testing.assert_close(got.R.diagonal().abs(), ref.R.diagonal().abs(), rtol=1e-3 if dtype == torch.float32
                                   else 1e-9, atol=1e-6 * (ref.R.abs().max().item() or 1.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_cuda_panel_on_subnormal_residuals(emulated, dtype):
    """The CUDA reflector kernel's tiny-beta case (repeated columns, a subnormal column): finite, orthonormal."""
    for name, A in dependent_columns(dtype).items():
        got = emulated(A, _block_size=7)
        assert bool(torch.isfinite(got.Q).all()), f"{name!r}: Q is not finite"
        check_structure(A, got)


@pytest.mark.parametrize("block_size", [1, 3, 20])
def test_emulated_norm_downdate_safeguard_matches_scipy(emulated, block_size):
    """Columns 12..23 nearly repeat 0..11: their downdated norms become noise and must be flagged, the
    panel ended early and the norms recomputed (the recompute_norms kernel), for scipy's pivots."""
    base = torch.randn(40, 12, dtype=torch.float64) * torch.logspace(0, 1, 12, dtype=torch.float64)
    near = base + 1e-9 * torch.randn(40, 12, dtype=torch.float64) * torch.logspace(0, 1.5, 12, dtype=torch.float64)
    A = torch.cat([base, near, torch.randn(40, 6, dtype=torch.float64) * 1e-11], dim=1)
    got = emulated(A, _block_size=block_size)
    _, _, p_ref = scipy.linalg.qr(A.numpy(), pivoting=True, mode="economic")
    np.testing.assert_array_equal(got.perm.numpy(), p_ref)
    check_structure(A, got)


@pytest.mark.parametrize("rule", [{"rank": 7}, {"rank": 21}, {"tau": 0.9}, {"tau": 1.0}, {"reltol": 1e-3},
                                  {"abstol": 1e-2, "rank": 25}])
def test_emulated_stopping_rules_stop_where_the_cpu_does(emulated, rule):
    gen = torch.Generator().manual_seed(3)
    A = with_spectrum(40, 30, 0.7 ** torch.arange(30, dtype=torch.float64), generator=gen)
    got, ref = emulated(A, _block_size=6, **rule), qrcp(A, _block_size=6, **rule)
    assert got.R.shape[0] == ref.R.shape[0], f"{rule}: stopped at {got.R.shape[0]}, the CPU at {ref.R.shape[0]}"
    _same_factorisation(got, ref, torch.float64)


def test_emulated_zero_matrix_and_raw_mode(emulated):
    zero = torch.zeros(9, 6)
    assert emulated(zero, reltol=0.0).R.shape == (0, 6)
    A = torch.randn(30, 20, dtype=torch.float64)
    raw, ref = emulated(A, mode="raw", _block_size=8), qrcp(A, mode="raw", _block_size=8)
    assert torch.equal(raw.perm, ref.perm)
    torch.testing.assert_close(raw.q(), ref.q(), rtol=0, atol=1e-12)


def test_emulated_randomized_method(emulated):
    """The randomized method's block pivots come from geqp3 on its sketch, whose panels are the CUDA ones."""
    A = with_spectrum(60, 45, 0.8 ** torch.arange(45, dtype=torch.float64))
    got = emulated(A, method="randomized", _block_size=16, _seed=11)
    ref = qrcp(A, method="randomized", _block_size=16, _seed=11)
    _same_factorisation(got, ref, torch.float64)
    check_structure(A, got, monotone=False)


@pytest.mark.parametrize("seed", ["1", "2", "3"])
def test_emulated_results_do_not_depend_on_the_thread_schedule(emulated, monkeypatch, seed):
    """Threads that race between two barriers (one writes what another reads) would make the bits depend
    on the order in which the threads run: the same factorisations under random schedules must agree to the
    bit with round robin's (safeguard-triggering and stopping-rule inputs included)."""
    base = torch.randn(30, 8, dtype=torch.float64)
    A = torch.cat([base, base + 1e-9 * torch.randn(30, 8, dtype=torch.float64), torch.randn(30, 9)], dim=1)
    B = torch.randn(33, 21)
    runs = [lambda: emulated(A, _block_size=5), lambda: emulated(B, _block_size=8),
            lambda: emulated(B, tau=0.8, _block_size=4)]
    expected = [run() for run in runs]
    monkeypatch.setenv("QRLORA_CUDA_EMULATION_SEED", seed)
    for i, run in enumerate(runs):
        for x, y in zip(run(), expected[i]):
            assert torch.equal(x, y), f"case {i}: the result depends on the thread schedule (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_at_the_gpu_block_sizes(emulated_gpu_blocks, dtype):
    """The kernels at exactly the GPU's launch geometry: the one-block kernels' 32-warp reductions fill
    every slot of their shared arrays, and the trailing pass runs 8 columns per block."""
    A = torch.randn(21, 13, dtype=dtype)
    got = emulated_gpu_blocks(A, _block_size=5)
    check_structure(A, got)
    _same_factorisation(got, qrcp(A, _block_size=5), dtype)
    if dtype == torch.float64:  # the safeguard: a flagged column ends the panel, the recompute kernel runs
        base = torch.randn(16, 5, dtype=torch.float64)
        B = torch.cat([base, base + 1e-9 * torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3) * 1e-11],
                      dim=1).to(dtype)
        got = emulated_gpu_blocks(B, _block_size=3)
        _, _, p_ref = scipy.linalg.qr(B.numpy(), pivoting=True, mode="economic")
        np.testing.assert_array_equal(got.perm.numpy(), p_ref)


def test_emulated_overflowing_norms_are_a_clear_error(emulated):
    """Every column norm overflows float32 (inf): the pivot search must stay in bounds (it once wrote past
    the end when no norm compared greater than -1) and the caller gets the clear error, as on the CPU."""
    A = torch.full((6, 4), 3e38)
    with pytest.raises(ValueError, match="overflows"):
        emulated(A)
