"""qrlora_linear: output, dx and dlam against float64 formulas, for both backends and both strategies."""
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from qrlora_kernels import dispatch, ops
from qrlora_kernels.functional import qrlora_linear
from qrlora_kernels.testing import REL_TOL, assert_rel_close


def _problem(T, K, N, r, *, dtype=torch.float32, bias=True, num_adapters=None, leading=None):
    x = torch.randn(*(leading or (T,)), K, dtype=dtype)
    weight = torch.randn(N, K, dtype=dtype) / K ** 0.5
    Q = torch.linalg.qr(torch.randn(N, r, dtype=torch.float64))[0].to(dtype)
    R = torch.randn(r, K, dtype=dtype)
    lam = torch.randn(r if num_adapters is None else (num_adapters, r), dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    return x, weight, b, Q, R, lam


def _reference(x, weight, bias, Q, R, lam, dy, lam_index=None):
    """float64 y, dx, dlam from the closed forms (independent of the code under test)."""
    x2, dy2 = x.double().reshape(-1, x.shape[-1]), dy.double().reshape(-1, dy.shape[-1])
    W, Qd, Rd = weight.double(), Q.double(), R.double()
    rows = lam.double() if lam_index is None else lam.double()[lam_index]
    s = x2 @ Rd.t()
    y = x2 @ W.t() + (s * rows) @ Qd.t() + (0 if bias is None else bias.double())
    g = dy2 @ Qd
    dx = dy2 @ W + (g * rows) @ Rd
    if lam_index is None:
        dlam = (s * g).sum(0)
    else:
        dlam = torch.zeros_like(lam, dtype=torch.float64).index_add_(0, lam_index, s * g)
    return y.reshape(dy.shape), dx.reshape(x.shape), dlam


def _run(x, weight, bias, Q, R, lam, **kwargs):
    x = x.detach().requires_grad_()
    lam = lam.detach().requires_grad_()
    y = qrlora_linear(x, weight, bias, Q, R, lam, **kwargs)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y, x.grad, lam.grad, dy


CASES = {
    "T1-r1": dict(T=1, K=17, N=33, r=1),
    "odd-rfull": dict(T=9, K=33, N=17, r=17),
    "3d": dict(T=None, K=24, N=40, r=5, leading=(2, 3)),
    "no-bias": dict(T=20, K=48, N=20, r=20, bias=False),
}


@pytest.mark.parametrize("with_r", [True, False], ids=["R", "no-R"])
@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype, backend, strategy, with_r):
    """With R, and without it (R=None: a store_r=False layer's call, R being Q^T W0; see ``_implied_r`` below)."""
    x, weight, bias, Q, R, lam = _problem(**CASES[case], dtype=dtype)
    y, dx, dlam, dy = _run(x, weight, bias, Q, R if with_r else None, lam, backend=backend, strategy=strategy)
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R if with_r else _implied_r(Q, weight), lam, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dlam.dtype == dtype
    assert_rel_close(y, y_ref, REL_TOL[dtype], name="y")
    assert_rel_close(dx, dx_ref, REL_TOL[dtype], name="dx")
    slack = 0.0 if with_r else _rounding_bound_without_r(x, weight, Q, dy) / torch.linalg.vector_norm(dlam_ref).item()
    assert_rel_close(dlam, dlam_ref, REL_TOL[dtype] + slack, name="dlam")


def _rounding_bound_without_r(x, weight, Q, dy):
    """Without R, S comes from a rounded intermediate: Y0 = x W0^T (lowrank) or R~ = Q^T W0 (merged), rounded to
    x's dtype (unit roundoff u). So S_ti is off by up to u sum_n |Y0_tn| |Q_ni| or u sum_k |x_tk| |R~_ik|, however
    small S_ti itself is, and dlam_i = sum_t S_ti G_ti by B_i = that times |G_ti|, summed over t. Returns 2 ||B||:
    what R=None may add to dlam's error beyond the band, negligible unless some S_ti is tiny against Y0 (on real
    weights and activations, all-MiniLM-L6-v2 in fp16, dlam's error is the same with and without R: 5e-4)."""
    u = torch.finfo(x.dtype).eps / 2
    x2, dy2 = x.double().reshape(-1, x.shape[-1]), dy.double().reshape(-1, dy.shape[-1])
    W, Qd = weight.double(), Q.double()
    per_s = torch.maximum((x2 @ W.t()).abs() @ Qd.abs(), x2.abs() @ _implied_r(Q, weight).abs().t())
    return 2 * u * torch.linalg.vector_norm((per_s * (dy2 @ Qd).abs()).sum(0)).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_x(backend):
    x, weight, bias, Q, R, lam = _problem(T=30, K=16, N=24, r=6)
    x_t = torch.randn(16, 30).t()  # a transposed view: strides (1, 30)
    assert not x_t.is_contiguous()
    y, dx, dlam, dy = _run(x_t, weight, bias, Q, R, lam, backend=backend, strategy="lowrank")
    y_ref, dx_ref, dlam_ref = _reference(x_t, weight, bias, Q, R, lam, dy)
    assert_rel_close(y, y_ref, name="y")
    assert_rel_close(dx, dx_ref, name="dx")
    assert_rel_close(dlam, dlam_ref, name="dlam")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multi_adapter_batch(backend):
    x, weight, bias, Q, R, lam = _problem(T=None, K=20, N=24, r=7, num_adapters=3, leading=(4, 5))
    ids = torch.tensor([2, 0, 2, 1])
    y, dx, dlam, dy = _run(x, weight, bias, Q, R, lam, backend=backend, adapter_ids=ids)
    lam_index = ids.repeat_interleave(5)
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R, lam, dy, lam_index)
    assert dlam.shape == (3, 7)
    assert_rel_close(y, y_ref, name="y")
    assert_rel_close(dx, dx_ref, name="dx")
    assert_rel_close(dlam, dlam_ref, name="dlam")
    # Per-token ids (shape x.shape[:-1]) mean the same thing.
    y_tokens = qrlora_linear(x, weight, bias, Q, R, lam, backend=backend, adapter_ids=lam_index.reshape(4, 5))
    assert_rel_close(y_tokens, y_ref, name="y (per-token ids)")


@pytest.mark.parametrize("layout", ["stride2", "expand"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_per_token_adapter_ids(backend, layout):
    """Per-token ids given as a view (every other element; one id expanded to every token) select the same rows
    as their contiguous copy: the kernels read ids as a dense vector (they used to read past the view)."""
    x, weight, bias, Q, R, lam = _problem(T=7, K=20, N=24, r=6, num_adapters=3)
    ids = torch.randint(0, 3, (14,))[::2] if layout == "stride2" else torch.tensor([2]).expand(7)
    assert not ids.is_contiguous()
    y, dx, dlam, dy = _run(x, weight, bias, Q, R, lam, backend=backend, adapter_ids=ids)
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R, lam, dy, ids.contiguous())
    assert_rel_close(y, y_ref, name="y")
    assert_rel_close(dx, dx_ref, name="dx")
    assert_rel_close(dlam, dlam_ref, name="dlam")


@pytest.mark.skipif(not hasattr(torch, "uint16"), reason="torch < 2.3 has no uint16")
@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_wide_unsigned_adapter_ids_are_refused_by_name(dtype):
    x, weight, bias, Q, R, lam = _problem(T=4, K=16, N=12, r=3, num_adapters=2)
    ids = torch.tensor([0, 1, 1, 0], dtype=getattr(torch, dtype))
    with pytest.raises(TypeError, match=f"adapter_ids must be a signed integer .* got dtype torch.{dtype}"):
        qrlora_linear(x, weight, bias, Q, R, lam, adapter_ids=ids)
    # uint8 (which torch fully supports) and int16 are taken.
    for ok in (torch.uint8, torch.int16):
        y = qrlora_linear(x, weight, bias, Q, R, lam, adapter_ids=ids.to(torch.int64).to(ok))
        assert_rel_close(y, _reference(x, weight, bias, Q, R, lam, y, ids.long())[0], name=f"y ({ok})")


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the interpreter's
def test_infinite_grad_output_gives_infinite_dlam_on_both_backends():
    """An inf in dY makes dlam +-inf (S * G summed over tokens), not NaN, on the Triton lowrank path too: its
    token tiles are padded with wrapped rows, which used to add 0 * inf = NaN to the sums."""
    x, weight, bias, Q, R, lam = _problem(T=5, K=16, N=16, r=4)
    dy = torch.randn(5, 16)
    dy[2, 3] = float("inf")
    grads = {}
    for backend in ("torch", "triton"):
        lam_b = lam.detach().requires_grad_()
        qrlora_linear(x, weight, bias, Q, R, lam_b, backend=backend, strategy="lowrank").backward(dy)
        grads[backend] = lam_b.grad
    assert torch.isinf(grads["torch"]).all() and not torch.isnan(grads["triton"]).any()
    assert torch.equal(grads["triton"], grads["torch"])


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_torch_func_transforms(strategy):
    """vmap and torch.func.grad run on the torch backend and match the float64 reference; the Triton kernels
    (no batching or functional-autograd rules) refuse them by name instead of failing inside torch."""
    from torch.func import grad, vmap

    x, weight, bias, Q, R, lam = _problem(T=None, K=16, N=20, r=5, leading=(3, 4))
    dy = torch.randn(4, 20)
    y = vmap(lambda xi: qrlora_linear(xi, weight, bias, Q, R, lam, backend="torch", strategy=strategy))(x)
    assert_rel_close(y, _reference(x, weight, bias, Q, R, lam, torch.empty(3, 4, 20))[0], name="vmap y")
    dlam = grad(lambda l: (qrlora_linear(x[0], weight, bias, Q, R, l, backend="torch", strategy=strategy)
                           * dy).sum())(lam)
    assert_rel_close(dlam, _reference(x[0], weight, bias, Q, R, lam, dy)[2], name="func.grad dlam")
    for transform in (vmap(lambda xi: qrlora_linear(xi, weight, bias, Q, R, lam, backend="triton",
                                                    strategy=strategy)),
                      lambda xs: grad(lambda l: qrlora_linear(xs[0], weight, bias, Q, R, l, backend="triton",
                                                              strategy=strategy).sum())(lam)):
        with pytest.raises(RuntimeError, match="backend='triton' cannot run under torch.func transforms"):
            transform(x)


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no-ids", "ids"])
def test_single_row_lam_keeps_its_shape(strategy, with_ids):
    """lam of shape (1, r) is one adapter: with adapter_ids (all 0) too, so the merged strategy serves it."""
    x, weight, bias, Q, R, lam = _problem(T=None, K=16, N=16, r=4, num_adapters=1, leading=(3, 2))
    ids = torch.zeros(3, dtype=torch.int64) if with_ids else None
    y, dx, dlam, dy = _run(x, weight, bias, Q, R, lam, backend="torch", strategy=strategy, adapter_ids=ids)
    assert dlam.shape == (1, 4)
    y_ref, _, dlam_ref = _reference(x, weight, bias, Q, R, lam[0], dy)
    assert_rel_close(y, y_ref, name="y")
    assert_rel_close(dlam[0], dlam_ref, name="dlam")


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_gradcheck_torch_path_float64(strategy):
    x, weight, bias, Q, R, lam = _problem(T=None, K=6, N=5, r=3, dtype=torch.float64, leading=(2, 3))
    inputs = [t.requires_grad_() for t in (x, weight, bias, Q, R, lam)]
    assert torch.autograd.gradcheck(
        lambda *a: qrlora_linear(*a, backend="torch", strategy=strategy), inputs)
    ids = torch.tensor([1, 0])
    lam2 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x_, lam_: qrlora_linear(x_, weight, bias, Q, R, lam_, backend="torch", adapter_ids=ids), (x, lam2))


def test_bf16_autocast_keeps_float32_lam():
    x, weight, bias, Q, R, lam = _problem(T=12, K=32, N=16, r=8)
    x.requires_grad_()
    lam.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qrlora_linear(x, weight, bias, Q, R, lam)
    assert y.dtype == torch.bfloat16
    y_ref, _, _ = _reference(x, weight, bias, Q, R, lam, torch.zeros(12, 16))
    assert_rel_close(y, y_ref, REL_TOL[torch.bfloat16], name="y")
    y.float().sum().backward()
    assert lam.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_lam_with_half_weights(backend):
    x, weight, bias, Q, R, lam = _problem(T=8, K=16, N=16, r=4, dtype=torch.float16)
    lam32 = lam.float()
    y, dx, dlam, dy = _run(x, weight, bias, Q, R, lam32, backend=backend, strategy="lowrank")
    assert y.dtype == torch.float16 and dlam.dtype == torch.float32
    y_ref, _, dlam_ref = _reference(x, weight, bias, Q, R, lam32, dy)
    assert_rel_close(y, y_ref, REL_TOL[torch.float16], name="y")
    assert_rel_close(dlam, dlam_ref, REL_TOL[torch.float16], name="dlam")


def test_strategy_override_reaches_the_ops(monkeypatch):
    x, weight, bias, Q, R, lam = _problem(T=4, K=16, N=16, r=4)
    for name, op in (("merged", "merged_linear"), ("lowrank", "lowrank_linear")):
        monkeypatch.setenv(dispatch.STRATEGY_ENV_VAR, name)
        with mock.patch.object(ops, op, wraps=getattr(ops, op)) as spy:
            qrlora_linear(x, weight, bias, Q, R, lam, backend="triton")
        assert spy.call_count == 1, name
    monkeypatch.setenv(dispatch.STRATEGY_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"\$QRLORA_STRATEGY must be one of"):
        qrlora_linear(x, weight, bias, Q, R, lam)


def test_bad_inputs(monkeypatch):
    x, weight, bias, Q, R, lam = _problem(T=4, K=16, N=12, r=3)
    with pytest.raises(ValueError, match="x has last dimension 15 but weight has in_features 16"):
        qrlora_linear(x[:, :15], weight, bias, Q, R, lam)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int32"):
        qrlora_linear(x.int(), weight, bias, Q, R, lam)
    with pytest.raises(TypeError, match="mixed dtypes: x is torch.float32 but Q is torch.float64"):
        qrlora_linear(x, weight, bias, Q.double(), R, lam)
    with pytest.raises(ValueError, match="mixed devices: x is on cpu but R is on meta"):
        qrlora_linear(x, weight, bias, Q, R.to("meta"), lam)
    with pytest.raises(ValueError, match=r"lam has shape \(4,\), expected \(3,\) or \(num_adapters, 3\)"):
        qrlora_linear(x, weight, bias, Q, R, torch.randn(4))
    with pytest.raises(ValueError, match=r"R has shape \(3, 15\), expected"):
        qrlora_linear(x, weight, bias, Q, R[:, :15], lam)
    with pytest.raises(ValueError, match=r"bias has shape \(11,\), expected \(12,\)"):
        qrlora_linear(x, weight, bias[:11], Q, R, lam)
    lam3 = torch.randn(3, 3)
    with pytest.raises(ValueError, match="lam holds 3 adapters"):
        qrlora_linear(x, weight, bias, Q, R, lam3)
    with pytest.raises(ValueError, match="adapter id 3 is out of range for 3 adapter"):
        qrlora_linear(x, weight, bias, Q, R, lam3, adapter_ids=torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="adapter id -1 is out of range"):
        qrlora_linear(x, weight, bias, Q, R, lam3, adapter_ids=torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"adapter_ids has shape \(3,\); expected"):
        qrlora_linear(x, weight, bias, Q, R, lam3, adapter_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="adapter_ids must be an integer tensor"):
        qrlora_linear(x, weight, bias, Q, R, lam3, adapter_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="strategy='merged' is impossible for a multi-adapter batch"):
        qrlora_linear(x, weight, bias, Q, R, lam3, adapter_ids=torch.tensor([0, 1, 2, 2]), strategy="merged")
    with pytest.raises(ValueError, match="backend must be one of"):
        qrlora_linear(x, weight, bias, Q, R, lam, backend="cuda")
    with pytest.raises(ValueError, match="strategy must be one of"):
        qrlora_linear(x, weight, bias, Q, R, lam, strategy="fused")
    with pytest.raises(ValueError, match="weight requires grad, but backend='triton'"):
        qrlora_linear(x, weight.requires_grad_(), bias, Q, R, lam, backend="triton")
    weight.requires_grad_(False)
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        qrlora_linear(x, weight, bias, Q, R, lam, backend="triton")


@pytest.mark.parametrize("with_r", [True, False], ids=["R", "no-R"])
@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_meta_tensors_give_meta_outputs(strategy, with_r):
    """Meta tensors (shapes without values, e.g. a QRLoraLinear built on the meta device) go through the torch
    backend like any op: they used to fail inside the autocast check ("unknown device type for autocast")."""
    x, weight, bias, Q, R, lam = (t.to("meta") for t in _problem(T=None, K=16, N=12, r=3, leading=(2, 5)))
    lam.requires_grad_()
    y = qrlora_linear(x, weight, bias, Q, R if with_r else None, lam, strategy=strategy)
    assert y.device.type == "meta" and y.shape == (2, 5, 12) and y.dtype == torch.float32
    y.sum().backward()
    assert lam.grad.device.type == "meta" and lam.grad.shape == (3,)
    lam3 = torch.empty(4, 3, device="meta")
    y = qrlora_linear(x, weight, bias, Q, R, lam3, adapter_ids=torch.empty(2, dtype=torch.int64, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 12)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors .* x is on meta"):
        qrlora_linear(x, weight, bias, Q, R, lam, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("with_r", [True, False], ids=["R", "no-R"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_cuda_triton_matches_float64_reference(dtype, strategy, with_r):
    x, weight, bias, Q, R, lam = (t.cuda() for t in _problem(T=None, K=96, N=80, r=40, dtype=dtype, leading=(3, 7)))
    y, dx, dlam, dy = _run(x, weight, bias, Q, R if with_r else None, lam.float(), strategy=strategy)  # triton
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R if with_r else _implied_r(Q, weight), lam.float(), dy)
    band = REL_TOL["tf32"] if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else REL_TOL[dtype]
    assert_rel_close(y, y_ref, band, name="y")
    assert_rel_close(dx, dx_ref, band, name="dx")
    slack = 0.0 if with_r else _rounding_bound_without_r(x, weight, Q, dy) / torch.linalg.vector_norm(dlam_ref).item()
    assert_rel_close(dlam, dlam_ref, band + slack, name="dlam")


@pytest.mark.gpu
def test_cuda_multi_adapter_bf16():
    x, weight, bias, Q, R, lam = (t.cuda() for t in _problem(T=None, K=64, N=48, r=16, dtype=torch.bfloat16,
                                                              num_adapters=4, leading=(5, 9)))
    ids = torch.tensor([3, 0, 1, 3, 2], device="cuda")
    y, dx, dlam, dy = _run(x, weight, bias, Q, R, lam.float(), adapter_ids=ids)
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R, lam.float(), dy, ids.repeat_interleave(9))
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dlam", dlam, dlam_ref)):
        assert_rel_close(got, want, REL_TOL[torch.bfloat16], name=name)


@pytest.mark.gpu
def test_cuda_automatic_backend_takes_torch_under_func_transforms():
    from torch.func import vmap

    x, weight, bias, Q, R, lam = (t.cuda() for t in _problem(T=None, K=32, N=48, r=8, leading=(3, 5)))
    y = vmap(lambda xi: qrlora_linear(xi, weight, bias, Q, R, lam))(x)
    assert_rel_close(y, _reference(x, weight, bias, Q, R, lam, torch.empty(3, 5, 48))[0], name="vmap y")


def test_adapter_id_range_is_rechecked_after_in_place_changes():
    x, weight, bias, Q, R, lam = _problem(T=4, K=16, N=12, r=3, num_adapters=2)
    ids = torch.tensor([0, 1, 1, 0])
    qrlora_linear(x, weight, bias, Q, R, lam, adapter_ids=ids)
    ids[2] = 5  # same tensor object, new contents: the remembered range must not be reused
    with pytest.raises(ValueError, match="adapter id 5 is out of range for 2 adapter"):
        qrlora_linear(x, weight, bias, Q, R, lam, adapter_ids=ids)


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_broadcast_grad_output(strategy):
    # y.sum().backward() hands the backward a stride-0 (expanded) dY.
    x, weight, bias, Q, R, lam = _problem(T=None, K=24, N=20, r=5, leading=(2, 8))
    x.requires_grad_()
    lam.requires_grad_()
    qrlora_linear(x, weight, bias, Q, R, lam, backend="triton", strategy=strategy).sum().backward()
    _, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R, lam, torch.ones(2, 8, 20))
    assert_rel_close(x.grad, dx_ref, name="dx")
    assert_rel_close(lam.grad, dlam_ref, name="dlam")


# ------------------------------------------------------------------ without R (store_r=False layers): R = Q^T W0

def _implied_r(Q, weight):
    """The R that R=None stands for, in float64: the first r rows of a pivoted QR's R are Q^T W0."""
    return Q.double().t() @ weight.double()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_r_multi_adapter_non_contiguous_and_broadcast_dy(backend):
    x, weight, bias, Q, _, lam = _problem(T=None, K=20, N=24, r=7, num_adapters=3, leading=(4, 5))
    ids = torch.tensor([2, 0, 2, 1])
    lam_index = ids.repeat_interleave(5)
    y, dx, dlam, dy = _run(x, weight, bias, Q, None, lam, backend=backend, adapter_ids=ids)
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, _implied_r(Q, weight), lam, dy, lam_index)
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dlam", dlam, dlam_ref)):
        assert_rel_close(got, want, name=name)
    # A transposed x, and the stride-0 dY that y.sum().backward() hands the backward.
    x_t = torch.randn(20, 30).t().requires_grad_()
    lam1 = lam[0].detach().requires_grad_()
    qrlora_linear(x_t, weight, bias, Q, None, lam1, backend=backend, strategy="lowrank").sum().backward()
    _, dx_ref, dlam_ref = _reference(x_t, weight, bias, Q, _implied_r(Q, weight), lam1, torch.ones(30, 24))
    assert_rel_close(x_t.grad, dx_ref, name="dx (transposed x, broadcast dY)")
    assert_rel_close(lam1.grad, dlam_ref, name="dlam (transposed x, broadcast dY)")


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_without_r_gradcheck_torch_path_float64(strategy):
    x, weight, bias, Q, _, lam = _problem(T=None, K=6, N=5, r=3, dtype=torch.float64, leading=(2, 3))
    inputs = [t.requires_grad_() for t in (x, weight, bias, Q, lam)]
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_, q_, lam_: qrlora_linear(x_, w_, b_, q_, None, lam_, backend="torch", strategy=strategy),
        inputs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_r_a_large_bias_does_not_swamp_the_update_in_half_precision(backend):
    """S = Y0 Q must come from the frozen output without its bias: projected from Y0 + b (rounded to fp16) and
    corrected by b Q, it would lose S to cancellation where |b| >> |x W0^T| (here ~1000x: dlam was off by 22 %)."""
    x, weight, bias, Q, _, lam = _problem(T=24, K=32, N=32, r=8, dtype=torch.float16)
    bias = (torch.randn(32) * 1000).half()
    y, dx, dlam, dy = _run(x, weight, bias, Q, None, lam, backend=backend, strategy="lowrank")
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, _implied_r(Q, weight), lam, dy)
    assert_rel_close(y - bias, y_ref - bias.double(), REL_TOL[torch.float16] * 50, name="y - b")  # y itself ~ b
    assert_rel_close(dlam, dlam_ref, REL_TOL[torch.float16], name="dlam")
    assert_rel_close(dx, dx_ref, REL_TOL[torch.float16], name="dx")


# In place over Y0 (the Q-only forward), the last row tile's wrapped rows (masked, never stored) re-read rows that
# the first tile has already updated, and the interpreter warns when their doubled values are cast to float16.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("with_r", [True, False], ids=["R", "no-R"])
@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_projections_past_float16_range(backend, strategy, with_r):
    """float16 with large activations and gradients (outliers, a loss scale): S * lam and G * lam pass 65504 while
    y and dx fit, because an orthonormal Q spreads each row over the outputs. No path may overflow on the way.
    x and dy are scaled so that y and dx peak at 30000; then |S lam| and |G lam| peak at 76000 or more (the least
    of 500 draws of this construction for each of R and no R) and x and dy stay under 30000."""
    T, K, N, r = 40, 320, 320, 4
    # With R, a small W0 lets the low-rank part dominate y; without R, S = Y0 Q comes from W0 itself.
    weight = (torch.randn(N, K) * (0.1 if with_r else 1.0) / K ** 0.5).half()
    Q = torch.linalg.qr(torch.randn(N, r, dtype=torch.float64))[0].half()
    R = torch.linalg.qr(torch.randn(K, r, dtype=torch.float64))[0].t().half() if with_r else None
    R_ref = R if with_r else _implied_r(Q, weight)
    lam = torch.randn(r).sign() * 10  # float32 (dlam ~ 1e8 would not fit float16)
    x, dy = torch.randn(T, K, dtype=torch.float64), torch.randn(T, N, dtype=torch.float64)
    y_unit, dx_unit, _ = _reference(x, weight, None, Q, R_ref, lam, dy)
    x, dy = (x * (3e4 / y_unit.abs().max())).half(), (dy * (3e4 / dx_unit.abs().max())).half()
    y_ref, dx_ref, dlam_ref = _reference(x, weight, None, Q, R_ref, lam, dy)
    s_lam = (x.double() @ R_ref.double().t()) * lam.double()
    g_lam = (dy.double() @ Q.double()) * lam.double()
    assert torch.isfinite(x).all() and torch.isfinite(dy).all()
    assert s_lam.abs().max() > 65504 and g_lam.abs().max() > 65504
    assert y_ref.abs().max() < 40000 and dx_ref.abs().max() < 40000

    x_, lam_ = x.clone().requires_grad_(), lam.clone().requires_grad_()
    y = qrlora_linear(x_, weight, None, Q, R, lam_, backend=backend, strategy=strategy)
    y.backward(dy)
    assert_rel_close(y, y_ref, REL_TOL[torch.float16], name="y")
    assert_rel_close(x_.grad, dx_ref, REL_TOL[torch.float16], name="dx")
    assert_rel_close(lam_.grad, dlam_ref, REL_TOL[torch.float16], name="dlam")


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_without_r_the_backward_holds_no_r(strategy, monkeypatch):
    """The point of R=None is memory: nothing of R's shape may be saved from the forward for the backward (it
    would be held for every layer until the backward), and the lowrank path must not form R at all."""
    x, weight, bias, Q, _, lam = _problem(T=40, K=24, N=20, r=6)
    x.requires_grad_()
    lam.requires_grad_()
    formed = []
    real = ops.implied_r
    monkeypatch.setattr(ops, "implied_r", lambda w, q: formed.append(1) or real(w, q))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qrlora_linear(x, weight, bias, Q, None, lam, backend="triton", strategy=strategy)
    assert (6, 24) not in saved, saved
    y.backward(torch.randn_like(y))
    assert formed == ([] if strategy == "lowrank" else [1, 1]), "R formed in the forward and again in the backward"
    # With R given, the same hooks do see it saved: the check above can fail.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qrlora_linear(x, weight, bias, Q, _implied_r(Q, weight).float(), lam, backend="triton", strategy=strategy)
    assert (6, 24) in saved


def test_without_r_bad_inputs():
    x, weight, bias, Q, _, lam = _problem(T=4, K=16, N=12, r=3)
    with pytest.raises(ValueError, match="Q has 11 rows but weight has out_features 12"):
        qrlora_linear(x, weight, bias, Q[:11], None, lam)
    with pytest.raises(TypeError, match="R must be a torch.Tensor, got list"):
        qrlora_linear(x, weight, bias, Q, [[1.0]], lam)
    with pytest.raises(ValueError, match=r"lam has shape \(4,\), expected \(3,\)"):
        qrlora_linear(x, weight, bias, Q, None, torch.randn(4))


@pytest.mark.parametrize("with_r", [True, False])
def test_merged_path_under_autocast_keeps_one_weight_sized_tensor(with_r):
    """Under autocast the op receives a cast copy of the weight. Its backward needs W_eff only (and R): the copy
    must not be saved as well, which would double what a merged layer holds until the backward."""
    x, weight, bias, Q, R, lam = _problem(T=40, K=24, N=20, r=6)
    x.requires_grad_()
    lam.requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autocast("cpu", dtype=torch.float16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qrlora_linear(x, weight, bias, Q, R if with_r else None, lam, backend="triton", strategy="merged")
    assert y.dtype == torch.float16
    assert saved.count((20, 24)) == 1, saved  # W_eff
    dy = torch.randn(40, 20)
    y.float().backward(dy)
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R if with_r else _implied_r(Q, weight), lam, dy)
    for name, got, want in (("y", y, y_ref), ("dx", x.grad, dx_ref), ("dlam", lam.grad, dlam_ref)):
        assert_rel_close(got, want, REL_TOL[torch.float16], name=name)


@pytest.mark.parametrize("with_r", [True, False], ids=["R", "Q-only"])
def test_torch_lowrank_half_precision_does_not_overflow_where_y_fits(with_r):
    """A large component of y that lam mostly cancels: S = x R^T (1e5) and S * lam leave float16's range although
    y (1.8e3) does not. The torch path forms the low-rank correction in float32."""
    n = 32
    q = torch.full((n, 1), n ** -0.5, dtype=torch.float64)
    weight, Q, R = torch.eye(n, dtype=torch.float64), q, q.t()  # R = Q^T W0
    lam = torch.tensor([-0.9], dtype=torch.float64)
    x = (1e5 * q.t()).repeat(3, 1) + torch.randn(3, n, dtype=torch.float64)
    expected = x @ (weight + (Q * lam) @ R).t()
    half = [t.to(torch.float16) for t in (x, weight, Q, R)]
    y = qrlora_linear(half[0], half[1], None, half[2], half[3] if with_r else None, lam.float(), backend="torch",
                      strategy="lowrank")
    assert torch.isfinite(y).all()
    assert_rel_close(y, expected, 1e-2, name="fp16 lowrank with a cancelled large component")


def test_float64_goes_to_torch_where_triton_has_no_float64_dot(monkeypatch):
    """Triton 3.2 to 3.4 (torch 2.6 to 2.8) have no float64 tl.dot: backend='triton' refuses float64 with a clear error naming
    the way out, instead of Triton's "Unsupported lhs dtype fp64" from inside a kernel."""
    from qrlora_kernels import functional
    monkeypatch.setattr(functional, "TRITON_FLOAT64_DOT", False)
    monkeypatch.setattr(functional, "TRITON_RELEASE", (3, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at call time: the CPU check passes on a GPU machine too
    x, w = torch.randn(5, 16, dtype=torch.float64), torch.randn(24, 16, dtype=torch.float64)
    Q, R, lam = torch.randn(24, 3, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64), torch.randn(3)
    with pytest.raises(TypeError, match=r"float64 with Triton 3\.2, which has no float64 tl\.dot; use backend='torch'"):
        qrlora_linear(x, w, None, Q, R, lam, backend="triton")


@pytest.mark.gpu
def test_float64_on_cuda_takes_torch_automatically_where_triton_has_no_float64_dot(monkeypatch):
    """The automatic backend, and QRLoraLinear's merge, keep float64 CUDA tensors off the Triton kernels there."""
    from qrlora_kernels import QRLoraLinear, functional, ops
    monkeypatch.setattr(functional, "TRITON_FLOAT64_DOT", False)

    def no_triton(*args, **kwargs):
        raise AssertionError("a Triton kernel was called for float64")

    monkeypatch.setattr(functional, "_check_triton_available", no_triton)
    monkeypatch.setattr(ops, "merged_weight", no_triton)
    x, w = torch.randn(5, 16, dtype=torch.float64, device="cuda"), torch.randn(24, 16, dtype=torch.float64,
                                                                               device="cuda")
    Q, R = torch.randn(24, 3, dtype=torch.float64, device="cuda"), torch.randn(3, 16, dtype=torch.float64,
                                                                               device="cuda")
    lam = torch.randn(3, dtype=torch.float64, device="cuda")
    expected = x @ (w + Q @ torch.diag(lam) @ R).T
    assert_rel_close(qrlora_linear(x, w, None, Q, R, lam), expected, 1e-12, name="y")
    layer = QRLoraLinear.from_linear(torch.nn.Linear(16, 24, dtype=torch.float64, device="cuda"), rank=3)
    with torch.no_grad():
        layer.lam.normal_()
    before = layer(x)
    layer.merge()
    assert_rel_close(layer(x), before, 1e-12, name="merged")


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
@pytest.mark.parametrize("with_r", [True, False], ids=["R", "Q-only"])
def test_torch_path_under_autocast_at_lam_zero_is_autocasts_linear(strategy, with_r):
    """A converted layer starts as the model it replaced: under bf16 autocast too, for either strategy (the merged
    path computed from the float32 x and W0 for a while: half its outputs differed, by up to 9e5 ulp near 0)."""
    x, weight, bias, Q, R, lam = _problem(T=64, K=48, N=40, r=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, weight, bias)
        got = qrlora_linear(x, weight, bias, Q, R if with_r else None, torch.zeros_like(lam), backend="torch",
                            strategy=strategy)
    assert got.dtype == expected.dtype == torch.bfloat16
    if strategy == "lowrank" and with_r:
        assert torch.equal(got, expected)
        return
    # Q-only lowrank adds the bias after rounding; merged runs one float32 GEMM over the same bf16 values,
    # bit for bit, which differs from autocast's bf16 GEMM in the rounding of the sums only.
    assert_rel_close(got.float(), expected.float(), 2.0 ** -8, name=f"{strategy} at lam = 0")
    if strategy == "merged":
        x16, w16, b16 = (t.bfloat16().float() for t in (x, weight, bias))
        assert torch.equal(got, F.linear(x16, w16, b16).bfloat16())


@pytest.mark.parametrize("with_r", [True, False], ids=["R", "Q-only"])
def test_torch_path_under_autocast_saves_the_float32_basis_itself(with_r):
    """The torch path computes the low-rank part in float32. Under bf16 autocast it took Q and R (and x) cast
    to bf16 and cast them back up: two casts each per call, bf16-rounded values, and the float32 copies saved
    for the backward (r * (N + K) * 4 bytes per layer). Now it reads the float32 tensors it was given."""
    x, weight, bias, Q, R, lam = _problem(T=24, K=32, N=16, r=8)
    R = R if with_r else None
    x.requires_grad_()
    lam.requires_grad_()
    given = {t.data_ptr() for t in (Q,) + ((R,) if with_r else ())}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qrlora_linear(x, weight, bias, Q, R, lam, backend="torch", strategy="lowrank")
    assert y.dtype == torch.bfloat16
    shapes = {(16, 8), (8, 16), (8, 32), (32, 8)}  # Q, R and their transposes (S is 24 x 8)
    basis_sized = [t for t in saved if tuple(t.shape) in shapes]
    assert basis_sized and all(t.data_ptr() in given for t in basis_sized), \
        [(tuple(t.shape), t.dtype) for t in basis_sized]
    dy = torch.randn(24, 16)
    y.float().backward(dy)
    y_ref, dx_ref, dlam_ref = _reference(x, weight, bias, Q, R if with_r else _implied_r(Q, weight), lam, dy)
    for name, got, want in (("y", y, y_ref), ("dx", x.grad, dx_ref), ("dlam", lam.grad, dlam_ref)):
        assert_rel_close(got, want, REL_TOL[torch.bfloat16], name=name)
