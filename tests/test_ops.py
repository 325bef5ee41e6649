"""The torch.library ops (opcheck), torch.compile(fullgraph=True) over QRLoraLinear, and the dispatcher."""
import pytest
import torch
from torch import nn

from qrlora_kernels import dispatch, ops
from qrlora_kernels.layer import QRLoraLinear
from qrlora_kernels.testing import assert_rel_close


def _operands(T=16, K=24, N=20, r=5, num_adapters=None, dtype=torch.float32):
    x = torch.randn(T, K, dtype=dtype, requires_grad=True)
    weight = torch.randn(N, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    Q = torch.linalg.qr(torch.randn(N, r, dtype=torch.float64))[0].to(dtype)
    R = torch.randn(r, K, dtype=dtype)
    lam = torch.randn(r if num_adapters is None else (num_adapters, r), dtype=dtype, requires_grad=True)
    return x, weight, bias, Q, R, lam


def _opcheck(op, args):
    # Every check torch.library offers: schema, autograd registration, fake tensors, AOT dispatch (static+dynamic).
    results = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


def test_opcheck_lowrank_ops():
    x, weight, bias, Q, R, lam = _operands()
    _opcheck(ops.lowrank_forward, (x, weight, bias, Q, R, lam, None))
    _opcheck(ops.lowrank_forward, (x, weight, None, Q, R, lam, None))
    x, weight, bias, Q, R, lam = _operands(num_adapters=3)
    index = torch.randint(0, 3, (16,))
    _opcheck(ops.lowrank_forward, (x, weight, bias, Q, R, lam, index))
    s = torch.randn(16, 5)
    dy = torch.randn(16, 20)
    for compute_dx in (True, False):
        _opcheck(ops.lowrank_backward, (dy, weight, Q, R, lam.detach(), s, index, compute_dx))


def test_opcheck_merged_ops():
    x, weight, bias, Q, R, lam = _operands()
    _opcheck(ops.merged_forward, (x, weight, bias, Q, R, lam))
    _opcheck(ops.merged_weight, (weight, Q, R, lam.detach()))
    dy = torch.randn(16, 20)
    for route in dispatch.DLAM_ROUTES:
        _opcheck(ops.merged_backward, (dy, x.detach(), weight, weight.clone(), Q, R, lam.detach(), route, True))


def test_opcheck_ops_without_r():
    """R=None (a store_r=False layer's call): the same ops, R formed inside where needed."""
    x, weight, bias, Q, _, lam = _operands()
    _opcheck(ops.lowrank_forward, (x, weight, bias, Q, None, lam, None))
    _opcheck(ops.merged_forward, (x, weight, bias, Q, None, lam))
    x, weight, bias, Q, _, lam = _operands(num_adapters=3)
    index = torch.randint(0, 3, (16,))
    _opcheck(ops.lowrank_forward, (x, weight, None, Q, None, lam, index))
    s, dy = torch.randn(16, 5), torch.randn(16, 20)
    for compute_dx in (True, False):
        _opcheck(ops.lowrank_backward, (dy, weight, Q, None, lam.detach(), s, index, compute_dx))
    x, weight, bias, Q, _, lam = _operands()
    for route in dispatch.DLAM_ROUTES:
        _opcheck(ops.merged_backward, (dy, x.detach(), weight, weight.clone(), Q, None, lam.detach(), route, True))


@pytest.mark.parametrize("strategy, num_adapters", [("lowrank", None), ("lowrank", 3), ("merged", None)])
def test_eager_route_equals_the_custom_ops_bit_for_bit(strategy, num_adapters, monkeypatch):
    """In eager mode functional goes through ops' autograd.Functions (no custom-op dispatch); they must run the
    same kernels and formulas as the registered ops: identical y, dx and dlam, and no custom op called."""
    x, weight, bias, Q, R, lam = _operands(num_adapters=num_adapters)
    index = None if num_adapters is None else torch.randint(0, num_adapters, (16,))
    dy = torch.randn(16, 20)
    if strategy == "lowrank":
        via_op = ops.lowrank_forward(x, weight, bias, Q, R, lam, index)[0]
    else:
        via_op = ops.merged_forward(x, weight, bias, Q, R, lam)[0]
    op_grads = torch.autograd.grad(via_op, (x, lam), dy)
    for name in ("lowrank_forward", "lowrank_backward", "merged_forward", "merged_backward"):
        monkeypatch.setattr(ops, name, None)  # the eager route must not touch them
    if strategy == "lowrank":
        eager = ops.lowrank_linear(x, weight, bias, Q, R, lam, index)
    else:
        eager = ops.merged_linear(x, weight, bias, Q, R, lam)
    eager_grads = torch.autograd.grad(eager, (x, lam), dy)
    assert torch.equal(eager, via_op)
    for got, expected, name in zip(eager_grads, op_grads, ("dx", "dlam")):
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
    assert_rel_close(eager_grads[1], torch.autograd.grad(
        ((x.double() @ R.double().t()) * (lam.double() if index is None else lam.double()[index])) @ Q.double().t(),
        lam, dy.double())[0], name="dlam against float64")


@pytest.mark.parametrize("route", dispatch.DLAM_ROUTES)
def test_merged_backward_routes_agree(route):
    x, weight, bias, Q, R, lam = _operands(T=12, K=20, N=16, r=6)
    dy = torch.randn(12, 16)
    w_eff = weight + (Q * lam.detach()) @ R
    dx, dlam = ops.merged_backward(dy, x.detach(), weight, w_eff, Q, R, lam.detach(), route, True)
    s, g = x.detach().double() @ R.double().t(), dy.double() @ Q.double()
    assert_rel_close(dlam, (s * g).sum(0), name=f"dlam via {route}")
    assert_rel_close(dx, dy.double() @ w_eff.double(), name="dx")


def _model(backend, strategy, num_adapters=1, store_r=True):
    torch.manual_seed(1)
    layers = []
    for k, n in ((24, 32), (32, 16)):
        layer = QRLoraLinear.from_linear(nn.Linear(k, n), rank=6, num_adapters=num_adapters, store_r=store_r)
        layer.backend, layer.strategy = backend, strategy
        with torch.no_grad():
            layer.lam.normal_()
        layers += [layer, nn.GELU()]
    return nn.Sequential(*layers[:-1])


class _AdapterModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, ids):
        return self.inner[2](self.inner[1](self.inner[0](x, adapter_ids=ids)), adapter_ids=ids)


@pytest.mark.parametrize("store_r", [True, False])
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend,strategy", [("torch", "lowrank"), ("torch", "merged"),
                                              ("triton", "lowrank"), ("triton", "merged")])
def test_compile_fullgraph(backend, strategy, compile_backend, store_r):
    torch._dynamo.reset()
    model = _model(backend, strategy, store_r=store_r)
    x = torch.randn(2, 5, 24)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = [layer.lam.grad.clone() for layer in (model[0], model[2])]
    model.zero_grad()

    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    assert_rel_close(y, expected.double(), name="compiled y")
    for layer, grad in zip((model[0], model[2]), expected_grads):
        assert_rel_close(layer.lam.grad, grad.double(), name="compiled dlam")


def test_compiled_model_does_not_recompile_when_eager_calls_see_new_shapes():
    """The strategy choice caches per shape in eager mode; a compiled graph must not guard on that cache."""
    torch._dynamo.reset()
    model = _model("triton", None)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 5, 24)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)
        compiled(x)
        for tokens in (3, 7, 11):  # eager calls fill the cache with new shapes
            model(torch.randn(tokens, 24))
        compiled(x)


def test_double_backward_through_the_kernels_is_a_clear_error():
    """The kernels' backward has no backward: create_graph=True must not silently drop the layer's term (nor give
    torch's "not used in the graph" for a gradient penalty on lam): refused, naming the backend that has one."""
    for strategy in ("lowrank", "merged"):
        model = _model("triton", strategy)
        x = torch.randn(4, 24, requires_grad=True)
        with pytest.raises(RuntimeError, match="no second derivative.*backend='torch'"):
            torch.autograd.grad(model(x).square().sum(), x, create_graph=True)


def test_triton_backend_refuses_bfloat16_on_the_cpu():
    model = _model("triton", "lowrank")
    with pytest.raises(TypeError, match="cannot take bfloat16"):
        model.to(torch.bfloat16)(torch.randn(3, 24, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="cannot take bfloat16"):
        _model("triton", "lowrank")(torch.randn(3, 24))


def test_compile_fullgraph_multi_adapter():
    torch._dynamo.reset()
    model = _AdapterModel(_model("triton", None, num_adapters=3))
    x = torch.randn(4, 3, 24)
    ids = torch.tensor([2, 0, 1, 2])
    expected = model(x, ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_rel_close(compiled(x, ids), expected.double(), name="compiled multi-adapter y")


def test_cost_model_choices(monkeypatch):
    monkeypatch.delenv(dispatch.STRATEGY_ENV_VAR, raising=False)
    N = K = 4096
    # Inference: lowrank's extra 2*T*r*(K+N) against merged's 2*N*K*r + a pass over W; crossover near N*K/(N+K).
    assert dispatch.choose_strategy(64, N, K, 16, training=False) == "lowrank"
    assert dispatch.choose_strategy(65536, N, K, 16, training=False) == "merged"
    costs = dispatch.strategy_costs(1 << 20, N, K, 256, training=True)
    assert costs["merged"] < costs["lowrank"]
    assert dispatch.choose_strategy(1 << 20, N, K, 256, training=True, per_token_lam=True) == "lowrank"
    # dlam: the weight-gradient route only pays off when r is a large fraction of N*K/(N+K).
    assert dispatch.choose_dlam_route(8192, N, K, 16) == "project"
    assert dispatch.choose_dlam_route(8192, 384, 384, 384) == "weight_grad"
    # Without a stored R (store_r=False): never cheaper; merged pays R = Q^T W0 twice (fwd + bwd) and lowrank
    # passes over the T x N output, which moves the crossover (here at r = N/2, T = 4096: merged -> lowrank).
    for T in (256, 4096, 65536):
        with_r = dispatch.strategy_costs(T, N, K, 2048, training=True)
        without = dispatch.strategy_costs(T, N, K, 2048, training=True, r_stored=False)
        assert all(without[k] > with_r[k] for k in with_r), T
    assert dispatch.choose_strategy(4096, N, K, 2048, training=True) == "merged"
    assert dispatch.choose_strategy(4096, N, K, 2048, training=True, r_stored=False) == "lowrank"
    monkeypatch.setenv(dispatch.STRATEGY_ENV_VAR, "merged")
    assert dispatch.choose_strategy(1, N, K, 16, training=False) == "merged"
    assert dispatch.choose_strategy(1, N, K, 16, training=False, strategy="lowrank") == "lowrank"
    assert dispatch.choose_strategy(1, N, K, 16, training=False, per_token_lam=True) == "lowrank"


@pytest.mark.gpu
def test_compile_fullgraph_inductor_cuda_bf16():
    torch._dynamo.reset()
    model = _model(None, None).cuda()
    x = torch.randn(4, 64, 24, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    assert_rel_close(y, expected.double(), 2e-2, name="inductor y")
    y.float().square().sum().backward()
    assert all(torch.isfinite(layer.lam.grad).all() for layer in (model[0], model[2]))


def test_compile_fullgraph_under_bf16_autocast():
    torch._dynamo.reset()
    model = _model("torch", None)
    x = torch.randn(2, 5, 24)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    assert_rel_close(y, expected.double(), 1e-2, name="compiled autocast y")
    y.float().square().sum().backward()
    assert model[0].lam.grad.dtype == torch.float32


def test_op_scope_marks_nvtx_on_cuda_only_and_turns_autocast_off(monkeypatch):
    """The per-op NVTX range (qrlora/fwd, qrlora/bwd) for Nsight: pushed and popped around the kernels on CUDA
    (checked here without a GPU by recording the calls), nothing on the CPU; autocast off inside either way."""
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    with ops._op_scope("qrlora/fwd", torch.device("cuda")):
        calls.append("inside")
    assert calls == [("push", "qrlora/fwd"), "inside", ("pop",)]
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ops._op_scope("qrlora/bwd", torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert calls == []
    with pytest.raises(ZeroDivisionError), ops._op_scope("qrlora/fwd", torch.device("cuda")):
        1 / 0
    assert calls == [("push", "qrlora/fwd"), ("pop",)], "the range must be closed when a kernel raises"
