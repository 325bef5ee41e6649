"""The Triton host functions against their float64 reference twins (kernels/reference.py).

On this CPU machine the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1): float32 and
float16. On CUDA the same cases run, plus bfloat16. Every output goes through a NaN-poisoned ``out=`` buffer
and is checked fully written. Shapes are odd and small (the interpreter's single config has 32x32 tiles and
16-wide K/r chunks, so these shapes span several tiles and partial chunks).
"""
import itertools

import pytest
import torch
import triton
from hypothesis import given, settings, strategies as st

from qrlora_kernels import kernels
from qrlora_kernels.kernels import reference, utils
from qrlora_kernels.testing import REL_TOL, assert_all_written, assert_rel_close, poisoned

# (T, K, N, r, strided): T=1, odd K and N, r=1, r=min(K, N), r just above a 16 (and 32) multiple,
# and one case where every input is a non-contiguous view.
CASES = {
    "one_token": (1, 33, 17, 5, False),
    "rank_one": (45, 17, 33, 1, False),
    "full_rank": (20, 33, 17, 17, False),
    "rank_above_block": (40, 45, 80, 33, False),
    "strided": (33, 45, 17, 9, True),
}

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]


def _skip_unrunnable(device, dtype):
    if device == "cpu":
        if not utils.INTERPRETED:
            pytest.skip("CPU tensors need TRITON_INTERPRET=1 set before import (the CUDA cases cover this run)")
        if dtype == torch.bfloat16:
            pytest.skip("Triton's interpreter has no bfloat16 (covered by the CUDA case)")


def _tensor(shape, dtype, device, strided=False, scale=1.0):
    """Random (never zero) data; ``strided`` gives a view with non-unit strides on every dimension."""
    if not strided:
        return torch.randn(shape, dtype=torch.float64).mul_(scale).to(device=device, dtype=dtype)
    if len(shape) == 1:
        return _tensor((2 * shape[0],), dtype, device, scale=scale)[::2]
    rows, cols = shape
    return _tensor((cols, 2 * rows), dtype, device, scale=scale).t()[::2]


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _band(dtype):
    # float32 cases force input_precision="ieee", so the exact-fp32 band applies on CUDA too.
    return REL_TOL[dtype]


def _problem(case, dtype, device):
    T, K, N, r, strided = CASES[case]
    return dict(
        x=_tensor((T, K), dtype, device, strided),
        weight=_tensor((N, K), dtype, device, strided, scale=K ** -0.5),
        Q=_tensor((N, r), dtype, device, strided, scale=N ** -0.5),
        R=_tensor((r, K), dtype, device, strided),
        dy=_tensor((T, N), dtype, device, strided),
        bias=_tensor((N,), dtype, device, strided),
        T=T, K=K, N=N, r=r,
    )


def _lam(r, num_adapters, device, T):
    if num_adapters is None:
        return torch.randn(r, device=device), None
    lam = torch.randn(num_adapters, r, device=device)
    lam_index = torch.randint(0, num_adapters, (T,), device=device)
    return lam, lam_index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_project(case, dtype, device):
    _skip_unrunnable(device, dtype)
    p = _problem(case, dtype, device)
    out = poisoned((p["T"], p["r"]), dtype=torch.float32, device=device)
    s = kernels.project(p["x"], p["R"].t(), out=out, input_precision="ieee")
    assert s is out
    assert_all_written(out, "S")
    # S is stored in float32 whatever the input, so the band is float32's only for float32 products.
    assert_rel_close(s, reference.project(_f64(p["x"]), _f64(p["R"]).t()), _band(dtype), name="S")


@pytest.mark.parametrize("num_adapters", [None, 3])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_lowrank_matmul_forward(case, dtype, with_bias, num_adapters, device):
    """y = x W0^T + (S*lam) Q^T + b with b = W0.t() and u = Q.t() (transposed views, as the op layer passes)."""
    _skip_unrunnable(device, dtype)
    p = _problem(case, dtype, device)
    lam, lam_index = _lam(p["r"], num_adapters, device, p["T"])
    s = torch.randn(p["T"], p["r"], device=device)  # float32, as project returns
    bias = p["bias"] if with_bias else None
    out = poisoned((p["T"], p["N"]), dtype=dtype, device=device)
    y = kernels.lowrank_matmul(p["x"], p["weight"].t(), s, lam, p["Q"].t(), bias, lam_index=lam_index,
                               out=out, input_precision="ieee")
    assert y is out and y.dtype == dtype
    assert_all_written(out, "y")
    expected = reference.lowrank_matmul(_f64(p["x"]), _f64(p["weight"]).t(), _f64(s), _f64(lam), _f64(p["Q"]).t(),
                                        _f64(bias), lam_index=lam_index)
    assert_rel_close(y, expected, _band(dtype), name="y")


@pytest.mark.parametrize("num_adapters", [None, 3])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_lowrank_update(case, dtype, with_bias, num_adapters, device):
    """out = c + (p*lam) u + b: a Q-only layer's update of the frozen output (c = Y0, u = Q^T, a transposed
    view, as the op layer passes; strided c in the "strided" case)."""
    _skip_unrunnable(device, dtype)
    p = _problem(case, dtype, device)
    lam, lam_index = _lam(p["r"], num_adapters, device, p["T"])
    s = torch.randn(p["T"], p["r"], device=device)
    bias = p["bias"] if with_bias else None
    out = poisoned((p["T"], p["N"]), dtype=dtype, device=device)
    y = kernels.lowrank_update(p["dy"], s, lam, p["Q"].t(), bias, lam_index=lam_index, out=out,
                               input_precision="ieee")
    assert y is out and y.dtype == dtype
    assert_all_written(out, "y")
    expected = reference.lowrank_update(_f64(p["dy"]), _f64(s), _f64(lam), _f64(p["Q"]).t(), _f64(bias),
                                        lam_index=lam_index)
    assert_rel_close(y, expected, _band(dtype), name="y")


@pytest.mark.parametrize("transposed", [False, True])
def test_lowrank_update_in_place(transposed, device):
    """out=c (what a Q-only layer's forward does with Y0): each tile reads and writes only its own elements, so the
    result is the out-of-place one; also for a transposed c, and with the wrapped rows of a partial last tile."""
    _skip_unrunnable(device, torch.float32)
    T, N, r = 37, 45, 18
    c = torch.randn(N, T, device=device).t() if transposed else torch.randn(T, N, device=device)
    s, Q, bias, lam = (torch.randn(T, r, device=device), torch.randn(N, r, device=device),
                       torch.randn(N, device=device), torch.randn(r, device=device))
    expected = reference.lowrank_update(_f64(c), _f64(s), _f64(lam), _f64(Q).t(), _f64(bias))
    y = kernels.lowrank_update(c, s, lam, Q.t(), bias, out=c, input_precision="ieee")
    assert y is c
    assert_rel_close(c, expected, REL_TOL[torch.float32], name="c updated in place")


def test_lowrank_update_errors():
    c, s, Q = torch.randn(8, 20), torch.randn(8, 4), torch.randn(20, 4)
    buf = torch.randn(8, 21)  # a shifted window of the same storage: partial overlap
    with pytest.raises(ValueError, match="out must not share memory with c"):
        kernels.lowrank_update(buf[:, :20], s, torch.randn(4), Q.t(), out=buf[:, 1:])
    storage = torch.randn(32 + 160)  # p and out in one storage (apart, but refused: no overlap analysis)
    with pytest.raises(ValueError, match="out must not share memory with p"):
        kernels.lowrank_update(c, storage[:32].view(8, 4), torch.randn(4), Q.t(), out=storage[32:].view(8, 20))
    with pytest.raises(ValueError, match="rank"):
        kernels.lowrank_update(c, s, torch.randn(4), Q.t()[:3])
    with pytest.raises(TypeError, match="mixed dtypes: c is torch.float32 but u is torch.float16"):
        kernels.lowrank_update(c, s, torch.randn(4), Q.t().half())
    with pytest.raises(ValueError, match=r"bias has shape \(19,\), expected \(20,\)"):
        kernels.lowrank_update(c, s, torch.randn(4), Q.t(), torch.randn(19))
    assert kernels.lowrank_update(c[:0], s[:0], torch.randn(4), Q.t()).shape == (0, 20)


@pytest.mark.parametrize("num_adapters", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_backward_chain(case, dtype, num_adapters, device):
    """G and dlam in one pass over dY, then dx = dY W0 + (G*lam) R, each against its reference twin."""
    _skip_unrunnable(device, dtype)
    p = _problem(case, dtype, device)
    T, N, K, r = p["T"], p["N"], p["K"], p["r"]
    lam, lam_index = _lam(r, num_adapters, device, T)
    s = torch.randn(T, r, device=device)
    g_out = poisoned((T, r), dtype=torch.float32, device=device)
    dlam_shape = (r,) if num_adapters is None else (num_adapters, r)
    dlam_out = poisoned(dlam_shape, dtype=torch.float32, device=device)
    g, dlam = kernels.project_and_reduce(p["dy"], p["Q"], s, lam_index=lam_index, num_adapters=num_adapters or 1,
                                         out=g_out, dlam_out=dlam_out, input_precision="ieee")
    assert g is g_out and dlam is dlam_out
    assert_all_written(g_out, "G")
    assert_all_written(dlam_out, "dlam")
    g_ref, dlam_ref = reference.project_and_reduce(_f64(p["dy"]), _f64(p["Q"]), _f64(s), lam_index=lam_index,
                                                   num_adapters=num_adapters or 1)
    # G and dlam are float32 sums of exact products of the inputs: float32's band for every input dtype.
    assert_rel_close(g, g_ref, REL_TOL[torch.float32], name="G")
    assert_rel_close(dlam, dlam_ref, REL_TOL[torch.float32], name="dlam")

    dx_out = poisoned((T, K), dtype=dtype, device=device)
    dx = kernels.lowrank_matmul(p["dy"], p["weight"], g, lam, p["R"], None, lam_index=lam_index, out=dx_out,
                                input_precision="ieee")
    assert_all_written(dx_out, "dx")
    dx_ref = reference.lowrank_matmul(_f64(p["dy"]), _f64(p["weight"]), _f64(g), _f64(lam), _f64(p["R"]),
                                      lam_index=lam_index)
    assert_rel_close(dx, dx_ref, _band(dtype), name="dx")


def _wide_half_rows(T, r, lam, lam_index, device, big=(7e4, 1e5)):
    """float32 p whose rows alternate: ordinary (|p lam| ~ 1), and one entry per row with |p lam| past float16's
    65504 (the rest ~ 1e3). Spread by an orthonormal Q over many columns such a row's output still fits float16."""
    p = torch.randn(T, r, dtype=torch.float64)
    lam_rows = (lam if lam_index is None else lam[lam_index]).double().cpu()
    lam_rows = lam_rows.expand(T, r)
    wide = torch.arange(T) % 3 == 1
    for i in wide.nonzero().flatten().tolist():
        p[i] *= 1e3 / lam_rows[i].abs().clamp_min(0.1)
        j = i % r
        p[i, j] = (big[i % 2] if i % 4 == 1 else -big[i % 2]) / lam_rows[i, j]
    return p.float().to(device), wide


# The inf and huge rows overflow in their own rows by design; the interpreter warns when it casts them.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("bad_value", [None, float("nan"), float("inf"), 1e12],
                         ids=["no-bad-row", "nan-row", "inf-row", "huge-row"])
@pytest.mark.parametrize("num_adapters", [None, 3])
@pytest.mark.parametrize("kernel", ["lowrank_matmul", "lowrank_update"])
def test_half_precision_rows_past_float16_range_do_not_overflow(kernel, num_adapters, bad_value, device):
    """float16: p * lam (float32) is cast to float16 before its dot, and some rows pass 65504. The kernels scale
    such tiles by an exact power of two; the result must match float64 row by row (the ordinary rows, which
    share their tiles with wide ones, as tightly as the wide rows) and every element must be written (an
    overflow gives inf there). A NaN, an inf or a finite value too large for any output to fit (1e12) in one row
    of p spoils that row only, as before (not the tile's scale: an inf or 1e12 counted in it would push the
    other rows into float16's subnormals)."""
    dtype = torch.float16
    _skip_unrunnable(device, dtype)
    T, K, N, r = 40, 24, 320, 20  # two r chunks (one partial), several row and column tiles
    lam, lam_index = _lam(r, num_adapters, device, T)
    p, wide = _wide_half_rows(T, r, lam, lam_index, device)
    bad_row = 3  # an ordinary row in the first row tile, with wide rows
    if bad_value is not None:
        p[bad_row, 2] = bad_value
    Q = torch.linalg.qr(torch.randn(N, r, dtype=torch.float64))[0].to(device=device, dtype=dtype)
    x, weight = _tensor((T, K), dtype, device), _tensor((N, K), dtype, device, scale=K ** -0.5)
    c, bias = _tensor((T, N), dtype, device), _tensor((N,), dtype, device)
    out = poisoned((T, N), dtype=dtype, device=device)
    if kernel == "lowrank_matmul":
        y = kernels.lowrank_matmul(x, weight.t(), p, lam, Q.t(), bias, lam_index=lam_index, out=out,
                                   input_precision="ieee")
        expected = reference.lowrank_matmul(_f64(x), _f64(weight).t(), _f64(p), _f64(lam), _f64(Q).t(), _f64(bias),
                                            lam_index=lam_index)
    else:
        y = kernels.lowrank_update(c, p, lam, Q.t(), bias, lam_index=lam_index, out=out, input_precision="ieee")
        expected = reference.lowrank_update(_f64(c), _f64(p), _f64(lam), _f64(Q).t(), _f64(bias),
                                            lam_index=lam_index)
    good = torch.ones(T, dtype=torch.bool)
    if bad_value is not None:
        good[bad_row] = False
        assert not torch.isfinite(y[bad_row]).all()
    assert (_f64(p) * _f64(lam if lam_index is None else lam[lam_index])).abs().amax(1)[wide].min() > 65504
    assert expected[good].abs().max() < 60000, "the test's outputs must fit float16"
    assert_all_written(out[good], "y")
    for i in good.nonzero().flatten().tolist():
        assert_rel_close(y[i], expected[i], REL_TOL[dtype], name=f"y row {i} ({'wide' if wide[i] else 'ordinary'})")


# T, K, N, r for the TMA variant: K and N not multiples of the tiles (TMA pads with zeros past the edges), row
# strides 16-byte aligned in fp16 and fp32, and more output tiles than the persistent grid has programs.
TMA_CASE = (45, 40, 72, 9)


@pytest.fixture
def tma_only(device, monkeypatch):
    """Restrict lowrank_matmul's autotuner to the persistent TMA configs (on the CPU: one such config)."""
    import importlib
    kernel = importlib.import_module("qrlora_kernels.kernels.lowrank_matmul")._lowrank_matmul_kernel
    if not utils.HAS_TENSOR_DESCRIPTORS:
        pytest.skip(f"Triton {triton.__version__} has no tensor descriptors (tl.make_tensor_descriptor)")
    if device == "cuda":
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("TMA needs an sm_90 GPU")
        configs = utils._GPU_TMA_CONFIGS
    else:
        configs = [utils._config(32, 32, 16, 2, 1, 1, USE_TMA=True, PERSISTENT=True)]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    # Fewer programs than output tiles, so that every program's loop takes more than one tile (on a GPU too).
    monkeypatch.setattr(utils, "num_programs", lambda device: 3)
    return kernel


def _nan_padded(rows, cols, dtype, device, scale=1.0):
    """A random (rows, cols) view into a NaN-filled (rows + 8, cols + 8) buffer: a tile that read past the
    operand's edges instead of taking TMA's zero padding would bring NaN into the result."""
    buffer = torch.full((rows + 8, cols + 8), float("nan"), dtype=dtype, device=device)
    view = buffer[:rows, :cols]
    view.copy_(_tensor((rows, cols), dtype, device, scale=scale))
    return view


@pytest.mark.parametrize("num_adapters", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_matmul_persistent_tma_variant(dtype, num_adapters, device, tma_only):
    """The sm_90 variant (tiles by TMA descriptors, one program per SM looping over the tiles) against the
    float64 reference: the forward (b = W0^T, K-major) with bias, and the dx GEMM (b = W0, row-major)."""
    _skip_unrunnable(device, dtype)
    assert {"TMA_OK", "B_K_MAJOR"} <= set(tma_only.keys), "a cached TMA choice must not serve other operands"
    T, K, N, r = TMA_CASE
    x, dy = _nan_padded(T, K, dtype, device), _nan_padded(T, N, dtype, device)
    weight = _nan_padded(N, K, dtype, device, scale=K ** -0.5)
    Q, R = _tensor((N, r), dtype, device, scale=N ** -0.5), _tensor((r, K), dtype, device)
    bias = _tensor((N,), dtype, device)
    lam, lam_index = _lam(r, num_adapters, device, T)
    s, g = torch.randn(T, r, device=device), torch.randn(T, r, device=device)
    for a, b, p, u, bias_, shape, name in ((x, weight.t(), s, Q.t(), bias, (T, N), "y"),
                                           (dy, weight, g, R, None, (T, K), "dx")):
        assert utils.tma_operands(a, b) == (True, name == "y")
        out = poisoned(shape, dtype=dtype, device=device)
        kernels.lowrank_matmul(a, b, p, lam, u, bias_, lam_index=lam_index, out=out, input_precision="ieee")
        assert tma_only.best_config.kwargs["USE_TMA"] and tma_only.best_config.kwargs["PERSISTENT"]
        assert_all_written(out, name)
        expected = reference.lowrank_matmul(_f64(a), _f64(b), _f64(p), _f64(lam), _f64(u), _f64(bias_),
                                            lam_index=lam_index)
        assert_rel_close(out, expected, _band(dtype), name=name)


def test_tma_is_offered_only_for_operands_that_suit_it(monkeypatch):
    w = torch.randn(72, 40)
    offered = utils.INTERPRETED and utils.HAS_TENSOR_DESCRIPTORS
    assert utils.tma_operands(torch.randn(5, 40), w.t()) == (offered, True)
    assert utils.tma_operands(torch.randn(5, 72), w) == (offered, False)
    # A 33-float row is 132 bytes (not a multiple of 16); a column-strided a; a broadcast a; no columns;
    # float64: no TMA.
    assert not utils.tma_operands(torch.randn(5, 33), torch.randn(72, 33).t())[0]
    assert not utils.tma_operands(torch.randn(40, 5).t(), w.t())[0]
    assert not utils.tma_operands(torch.randn(1, 40).expand(5, 40), w.t())[0]
    assert not utils.tma_operands(torch.randn(5, 0), torch.randn(72, 0).t())[0]
    assert not utils.tma_operands(torch.randn(5, 40, dtype=torch.float64), w.double().t())[0]
    with monkeypatch.context() as m:  # a Triton without tensor descriptors (3.2 and 3.3)
        m.setattr(utils, "HAS_TENSOR_DESCRIPTORS", False)
        assert utils.tma_operands(torch.randn(5, 40), w.t()) == (False, True)
    monkeypatch.setenv("QRLORA_TMA", "0")
    assert utils.tma_operands(torch.randn(5, 40), w.t()) == (False, True)
    prune = utils.prune_gemm("M", "N")
    configs = [utils._tiled(c) for c in utils._GPU_GEMM_CONFIGS] + utils._GPU_TMA_CONFIGS
    assert not any(c.kwargs["USE_TMA"] for c in prune(configs, {"M": 4096, "N": 4096, "TMA_OK": 0}))
    assert sum(c.kwargs["USE_TMA"] for c in prune(configs, {"M": 4096, "N": 4096, "TMA_OK": 1})) == 6
    # Few tokens: only the 64-row TMA tiles remain (the others are pruned as oversized).
    assert {c.kwargs["BLOCK_M"] for c in prune(utils._GPU_TMA_CONFIGS, {"M": 45, "N": 72, "TMA_OK": 1})} == {64}
    with pytest.raises(ValueError, match="only TMA configs are left"):
        prune(utils._GPU_TMA_CONFIGS, {"M": 45, "N": 72, "TMA_OK": 0})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["one_token", "full_rank", "rank_above_block", "strided"])
def test_merged_weight(case, dtype, device):
    _skip_unrunnable(device, dtype)
    p = _problem(case, dtype, device)
    lam = torch.randn(p["r"], device=device)
    out = poisoned((p["N"], p["K"]), dtype=dtype, device=device)
    w_eff = kernels.merged_weight(p["weight"], p["Q"], lam, p["R"], out=out, input_precision="ieee")
    assert w_eff is out
    assert_all_written(out, "W_eff")
    expected = reference.merged_weight(_f64(p["weight"]), _f64(p["Q"]), _f64(lam), _f64(p["R"]))
    assert_rel_close(w_eff, expected, _band(dtype), name="W_eff")


def test_merged_weight_in_place_and_single_row_lam(device):
    """out=weight merges in place (each tile reads its W0 block before writing it); lam (1, r) is accepted."""
    _skip_unrunnable(device, torch.float32)
    p = _problem("rank_above_block", torch.float32, device)
    lam = torch.randn(1, p["r"], device=device)
    expected = reference.merged_weight(_f64(p["weight"]), _f64(p["Q"]), _f64(lam[0]), _f64(p["R"]))
    weight = p["weight"].clone()
    assert kernels.merged_weight(weight, p["Q"], lam, p["R"], out=weight, input_precision="ieee") is weight
    assert_rel_close(weight, expected, name="in-place W_eff")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["one_token", "full_rank", "strided"])
def test_dlam_via_weight_grad(case, dtype, device):
    """Against its reference, and against the projection route (the two dlam routes must agree)."""
    _skip_unrunnable(device, dtype)
    p = _problem(case, dtype, device)
    dlam = kernels.dlam_via_weight_grad(p["dy"], p["x"], p["Q"], p["R"], input_precision="ieee")
    assert dlam.dtype == torch.float32 and dlam.shape == (p["r"],)
    expected = reference.dlam_via_weight_grad(_f64(p["dy"]), _f64(p["x"]), _f64(p["Q"]), _f64(p["R"]))
    # The weight gradient is kept in float32 for half inputs, so float32's band holds (up to r*K cancellation).
    assert_rel_close(dlam, expected, 10 * REL_TOL[torch.float32], name="dlam (weight grad)")
    s = kernels.project(p["x"], p["R"].t(), input_precision="ieee")
    _, dlam_projected = kernels.project_and_reduce(p["dy"], p["Q"], s, input_precision="ieee")
    assert_rel_close(dlam, dlam_projected, 10 * REL_TOL[torch.float32], name="dlam routes")


def test_float64_inputs_accumulate_in_float64(device):
    _skip_unrunnable(device, torch.float64)
    from qrlora_kernels import functional
    if not functional.TRITON_FLOAT64_DOT:
        pytest.skip(f"Triton {triton.__version__} has no float64 tl.dot")
    p = _problem("rank_above_block", torch.float64, device)
    lam = torch.randn(p["r"], dtype=torch.float64, device=device)
    s = kernels.project(p["x"], p["R"].t())
    assert s.dtype == torch.float64
    y = kernels.lowrank_matmul(p["x"], p["weight"].t(), s, lam, p["Q"].t(), p["bias"])
    assert_rel_close(y, reference.qrlora_linear(p["x"], p["weight"], p["bias"], p["Q"], p["R"], lam), name="y")


def test_float64_dot_operands_are_refused_clearly_where_triton_has_no_float64_dot(monkeypatch):
    """Triton 3.2 to 3.4 (torch 2.6 to 2.8) have no float64 tl.dot; their own error names no way out. A float64 lam (it only
    scales a tile) stays allowed."""
    from qrlora_kernels import functional
    monkeypatch.setattr(functional, "TRITON_FLOAT64_DOT", False)
    monkeypatch.setattr(functional, "TRITON_RELEASE", (3, 2))
    x, basis = torch.randn(20, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"a is float64, but Triton 3\.2 has no float64 tl\.dot; use the pure-torch"):
        kernels.project(x, basis)
    for name in ("a", "b", "p", "u"):
        with pytest.raises(TypeError, match=rf"{name} is float64"):
            utils.check_float(name, torch.randn(1, dtype=torch.float64))
    utils.check_float("lam", torch.randn(1, dtype=torch.float64), in_dot=False)
    utils.check_float("x", torch.randn(1))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(T=st.integers(1, 70), K=st.integers(1, 70), N=st.integers(1, 70), data=st.data())
def test_layer_forward_random_shapes(T, K, N, data):
    """project + lowrank_matmul = the whole layer, on random shapes and ranks (CPU, float32)."""
    if not utils.INTERPRETED:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 set before import")
    r = data.draw(st.integers(1, min(K, N)), label="r")
    x, weight, Q, R = (torch.randn(*shape) for shape in ((T, K), (N, K), (N, r), (r, K)))
    lam, bias = torch.randn(r), torch.randn(N)
    s = kernels.project(x, R.t())
    y = kernels.lowrank_matmul(x, weight.t(), s, lam, Q.t(), bias)
    expected = reference.qrlora_linear(*(t.double() for t in (x, weight, bias, Q, R, lam)))
    assert_rel_close(y, expected, name="y")


def test_zero_tokens(device):
    _skip_unrunnable(device, torch.float32)
    p = _problem("full_rank", torch.float32, device)
    x = p["x"][:0]
    s = kernels.project(x, p["R"].t())
    assert s.shape == (0, p["r"])
    lam = torch.randn(p["r"], device=device)
    assert kernels.lowrank_matmul(x, p["weight"].t(), s, lam, p["Q"].t()).shape == (0, p["N"])
    _, dlam = kernels.project_and_reduce(p["dy"][:0], p["Q"], s)
    assert torch.equal(dlam, torch.zeros(p["r"], device=device))


# ---------------------------------------------------------------- error paths

def _cpu_problem():
    return _problem("full_rank", torch.float32, "cpu")


def test_mismatched_sizes_name_both_sizes():
    p = _cpu_problem()
    x, W, Q, R = p["x"], p["weight"], p["Q"], p["R"]
    s = torch.randn(p["T"], p["r"])
    lam = torch.randn(p["r"])
    with pytest.raises(ValueError, match=r"inner dimension mismatch: a.shape\[1\] is 33 but b.shape\[0\] is 32"):
        kernels.lowrank_matmul(x, torch.randn(32, p["N"]), s, lam, Q.t())
    with pytest.raises(ValueError, match=r"rank mismatch: p.shape\[1\] is 17 but u.shape\[0\] is 16"):
        kernels.lowrank_matmul(x, W.t(), s, lam, Q.t()[:16])
    with pytest.raises(ValueError, match=r"inner dimension mismatch: a.shape\[1\] is 33 but basis.shape\[0\] is 30"):
        kernels.project(x, R.t()[:30])
    with pytest.raises(ValueError, match=r"s has shape \(20, 16\), expected \(tokens, rank\) = \(20, 17\)"):
        kernels.project_and_reduce(p["dy"], Q, s[:, :16])
    with pytest.raises(ValueError, match=r"rank mismatch: Q.shape\[1\] is 17 but R.shape\[0\] is 16"):
        kernels.merged_weight(W, Q, lam, R[:16])
    with pytest.raises(ValueError, match=r"token count mismatch: dy.shape\[0\] is 20 but x.shape\[0\] is 19"):
        kernels.dlam_via_weight_grad(p["dy"], x[:19], Q, R)
    with pytest.raises(ValueError, match=r"bias has shape \(16,\), expected \(17,\)"):
        kernels.lowrank_matmul(x, W.t(), s, lam, Q.t(), p["bias"][:16])


def test_bad_lam_and_lam_index():
    p = _cpu_problem()
    x, W, Q = p["x"], p["weight"], p["Q"]
    s = torch.randn(p["T"], p["r"])
    with pytest.raises(ValueError, match=r"lam has shape \(5,\), expected \(17,\) or \(num_adapters, 17\)"):
        kernels.lowrank_matmul(x, W.t(), s, torch.randn(5), Q.t())
    with pytest.raises(ValueError, match="lam has 3 adapters but no lam_index was given"):
        kernels.lowrank_matmul(x, W.t(), s, torch.randn(3, p["r"]), Q.t())
    with pytest.raises(ValueError, match=r"lam_index has shape \(7,\) but there are 20 tokens"):
        kernels.lowrank_matmul(x, W.t(), s, torch.randn(3, p["r"]), Q.t(), lam_index=torch.zeros(7, dtype=torch.long))
    with pytest.raises(TypeError, match="lam_index must be an int32 or int64 tensor, got torch.float32"):
        kernels.project_and_reduce(p["dy"], Q, s, lam_index=torch.zeros(p["T"]), num_adapters=2)
    strided = torch.randint(0, 3, (2 * p["T"],))[::2]  # the kernels read ids as a dense vector
    with pytest.raises(ValueError, match="lam_index must be contiguous .* got stride 2"):
        kernels.lowrank_matmul(x, W.t(), s, torch.randn(3, p["r"]), Q.t(), lam_index=strided)
    with pytest.raises(ValueError, match="lam_index must be contiguous .* got stride 0"):
        kernels.project_and_reduce(p["dy"], Q, s, lam_index=torch.tensor([1]).expand(p["T"]), num_adapters=2)
    with pytest.raises(ValueError, match="the merged strategy serves one adapter"):
        kernels.merged_weight(W, Q, torch.randn(2, p["r"]), p["R"])


def test_bad_dtypes_and_out(monkeypatch):
    # Some of these checks come after the device check: let CPU tensors through it even on a CUDA machine
    # (every call below fails before any launch).
    monkeypatch.setattr(utils, "INTERPRETED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = _cpu_problem()
    x, W, Q, R = p["x"], p["weight"], p["Q"], p["R"]
    s = torch.randn(p["T"], p["r"])
    lam = torch.randn(p["r"])
    with pytest.raises(TypeError, match="mixed dtypes: a is torch.float32 but b is torch.float16"):
        kernels.lowrank_matmul(x, W.t().half(), s, lam, Q.t())
    with pytest.raises(TypeError, match="a has dtype torch.int64"):
        kernels.project(torch.ones(3, p["K"], dtype=torch.long), R.t())
    with pytest.raises(ValueError, match=r"out has shape \(20, 16\), expected \(20, 17\)"):
        kernels.lowrank_matmul(x, W.t(), s, lam, Q.t(), out=torch.empty(p["T"], 16))
    with pytest.raises(TypeError, match="out has dtype torch.float16, expected torch.float32"):
        kernels.project(x, R.t(), out=torch.empty(p["T"], p["r"], dtype=torch.float16))
    with pytest.raises(ValueError, match="input_precision must be one of"):
        kernels.project(x, R.t(), input_precision="tf64")


def test_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = _cpu_problem()
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing qrlora_kernels"):
        utils.check_runnable(p["x"])
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing qrlora_kernels"):
        kernels.project(p["x"], p["R"].t())


def test_mixed_devices_are_named():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="mixed devices: cpu and meta"):
        utils.check_runnable(x, torch.empty(16, 4, device="meta"))


def test_dot_precision_rule(monkeypatch):
    """float32 follows allow_tf32 unless forced; half inputs and the interpreter always get "ieee"."""
    assert utils.dot_precision(torch.float16, "tf32") == "ieee"
    # Not monkeypatch for allow_tf32: it is a property-like attribute of cuBLASModule (no __dict__ entry), so
    # pytest >= 9.2 undoes it with delattr, which fails; that failure skipped restoring INTERPRETED and every
    # later interpreted kernel test failed with it.
    matmul = torch.backends.cuda.matmul
    inherited = matmul.allow_tf32
    monkeypatch.setattr(utils, "INTERPRETED", False)
    try:
        matmul.allow_tf32 = True
        assert utils.dot_precision(torch.float32) == "tf32"
        assert utils.dot_precision(torch.float32, "ieee") == "ieee"
        matmul.allow_tf32 = False
        assert utils.dot_precision(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = inherited
    monkeypatch.setattr(utils, "INTERPRETED", True)
    assert utils.dot_precision(torch.float32, "tf32") == "ieee"


def test_interpreter_uses_exactly_one_config():
    if not utils.INTERPRETED:
        pytest.skip("only meaningful under the interpreter")
    assert len(utils.gemm_configs()) == len(utils.project_configs()) == 1
    config = utils.gemm_configs()[0].kwargs
    assert min(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) >= 16  # tl.dot's minimum


def _skip_unless_aot_check_runs():
    """aot_check needs Triton's NVIDIA backend and the launcher internals it reads (Triton 3.6+)."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    from qrlora_kernels.kernels.aot_check import unsupported_reason
    reason = unsupported_reason()
    if reason:
        pytest.skip(reason)


def test_kernels_compile_for_sm80_and_sm90():
    """The interpreter never runs the GPU compiler: build the bf16 variants for A100 and H100 ahead of time."""
    import os
    import subprocess
    import sys

    _skip_unless_aot_check_runs()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "qrlora_kernels.kernels.aot_check", "--arch", "80,90",
                           "--dtypes", "bf16"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    built = [line for line in done.stdout.splitlines() if line.startswith("ok   sm_")]
    assert len(built) == 23, done.stdout  # 10 variants x 2 archs + 3 TMA ones on sm_90
    from qrlora_kernels.kernels import aot_check
    if aot_check.cuobjdump_path() is not None:
        assert all(" registers, stack " in line for line in built), done.stdout
        # The GEMM kernels' first configs (the largest tiles) keep their accumulators in registers on sm_90: the
        # low-rank loop's 16-wide r chunks are what keeps lowrank_matmul and lowrank_update from spilling.
        spilling = [line for line in built if line.startswith("ok   sm_90") and "SPILLS" in line
                    and line.split()[2] in ("lowrank_matmul", "lowrank_update", "merged_weight")]
        assert not spilling, "\n".join(spilling)


def _record_every_launch_of_the_layer(monkeypatch) -> list[tuple[str, dict]]:
    """Run QRLoraLinear's Triton paths (R kept or not, one adapter with a bias or several without, lowrank and
    merged; forward and backward) with each kernel wrapped to record its launches: (kernel name, arguments)."""
    import importlib

    from qrlora_kernels import QRLoraLinear, qrlora_linear

    if not utils.INTERPRETED:
        pytest.skip("records launches under the interpreter")
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, dict(zip(self.kernel.fn.arg_names, args), **kwargs)))
                return self.kernel[grid](*args, **kwargs)
            return launch

    # By module path: ``kernels.lowrank_matmul`` is also the re-exported function.
    for module, name in (("lowrank_matmul", "_lowrank_matmul_kernel"), ("merged_weight", "_merged_weight_kernel"),
                         ("projection", "_project_kernel")):
        module = importlib.import_module(f"qrlora_kernels.kernels.{module}")
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    # The same divisibility pattern as aot_check's 4096-token 4096 x 4096 layer at rank 200: every size a multiple
    # of 16 but the rank (neither 1 nor a multiple of 16).
    T, K, N, r = 32, 48, 64, 24
    layer = QRLoraLinear.from_linear(torch.nn.Linear(K, N), rank=r)  # the layer's own buffers and their strides
    for keep_r, adapters, strategy in itertools.product((True, False), (1, 3), ("lowrank", "merged")):
        if strategy == "merged" and adapters > 1:
            continue  # several adapters always take the lowrank path
        x = torch.randn(T, K, requires_grad=True)
        lam = torch.randn(adapters, r, requires_grad=True) if adapters > 1 else torch.randn(r, requires_grad=True)
        ids = torch.arange(T) % adapters if adapters > 1 else None
        y = qrlora_linear(x, layer.weight, layer.bias if adapters == 1 else None, layer.Q,
                          layer.R if keep_r else None, lam, backend="triton", adapter_ids=ids, strategy=strategy)
        y.backward(torch.randn_like(y))  # a contiguous dY, as a loss gives (y.sum()'s is a broadcast view)
    return launches


def test_every_launch_asks_for_fp_fusion(monkeypatch):
    """Triton 3.9 warns at each compile that leaves fp fusion to its default, which Triton 3.10 turns off: every
    kernel launch asks for it (as every earlier release compiled the kernels), and so does aot_check."""
    launches = _record_every_launch_of_the_layer(monkeypatch)
    kernels = {name for name, _ in launches}
    assert kernels == {"_lowrank_matmul_kernel", "_merged_weight_kernel", "_project_kernel"}, kernels
    assert all(args.get("enable_fp_fusion") is True for _, args in launches), [
        name for name, args in launches if args.get("enable_fp_fusion") is not True]


def test_aot_check_compiles_with_the_launch_options(monkeypatch):
    _skip_unless_aot_check_runs()
    from qrlora_kernels.kernels import aot_check
    asked = []

    class Compiled:
        asm = {"cubin": b""}
        metadata = type("Metadata", (), {"shared": 0})

    monkeypatch.setattr(aot_check.triton, "compile", lambda source, target, options: asked.append(options) or Compiled)
    monkeypatch.setattr(aot_check, "resource_usage", lambda cubin: (None, None))
    variant = next(iter(aot_check.variants(["bf16"], all_configs=False)))
    aot_check.compile_kernel(variant, variant.configs[0], 90)
    assert asked and asked[0]["enable_fp_fusion"] is True and asked[0]["num_warps"] == variant.configs[0].num_warps


def test_aot_check_compiles_each_variant_as_the_layer_launches_it(monkeypatch):
    """aot_check compiles each variant as Triton specialises a representative launch (aot_check's
    integers: 1 becomes a constant, multiples of 16 are marked divisible). Record the kernels' real launches from
    QRLoraLinear's paths (R kept or not, one adapter with a bias or several without, lowrank and merged) and
    check that each variant's integers specialise exactly as one of them: a launch that changes its strides
    without the table following would make aot_check report on code the GPU never runs."""
    _skip_unless_aot_check_runs()
    from qrlora_kernels.kernels import aot_check

    variants = list(aot_check.variants(["fp32"], all_configs=False))  # before the kernels are wrapped below
    launches = _record_every_launch_of_the_layer(monkeypatch)

    flags = ("HAS_MATMUL", "HAS_LOWRANK", "HAS_BIAS", "PER_TOKEN_LAM", "B_K_MAJOR", "REDUCE")
    for variant in variants:
        wanted = {k: v for k, v in variant.constexprs.items() if k in flags}
        same_kind = [args for kernel, args in launches if kernel == variant.kernel.fn.__name__
                     and all(args.get(k) == v for k, v in wanted.items())]
        if variant.label.startswith("lowrank_matmul fp32 lowrank=False"):
            continue  # kernels.matmul, which the layer does not call
        assert same_kind, f"the layer never launched {variant.label}"
        ints = {k: v for k, v in variant.ints.items() if k not in aot_check._DO_NOT_SPECIALIZE}

        def mismatches(args):
            pairs = {k: (aot_check.specialisation(v, k), aot_check.specialisation(int(args[k]), k))
                     for k, v in ints.items()}
            return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}
        assert any(not mismatches(args) for args in same_kind), (
            f"{variant.label}: aot_check's integers specialise otherwise than every real launch "
            f"(aot_check, launch): {min((mismatches(a) for a in same_kind), key=len)}")
        assert set(ints) | set(aot_check._DO_NOT_SPECIALIZE) >= {
            k for k, v in same_kind[0].items() if isinstance(v, int) and not isinstance(v, bool) and k not in flags}


def test_autotune_key_buckets_tokens_and_prunes_oversized_tiles():
    assert [utils.token_bucket(t) for t in (0, 1, 16, 17, 1000)] == [1, 1, 16, 32, 1024]
    prune = utils.prune_by_size("M", "N")
    decode = prune(utils._GPU_GEMM_CONFIGS, {"M": 1, "N": 4096})
    assert decode and all(c.kwargs["BLOCK_M"] == 16 for c in decode)
    assert prune(utils._GPU_GEMM_CONFIGS, {"M": 8192, "N": 4096}) == utils._GPU_GEMM_CONFIGS
    # Nothing fits a 1 x 1 output: the smallest config is kept rather than none.
    tiny = prune(utils._GPU_PROJECT_CONFIGS, {"M": 1, "N": 1})
    assert [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in tiny] == [32 * 32]
