"""Host (Python) time per call of the Triton route, with the kernels stubbed out (not part of ``pytest tests``)::

    python -m pytest -q benchmarks/micro/test_op_overhead.py --benchmark-only --benchmark-min-rounds=500

On a GPU every kernel launch is asynchronous, so a layer's wall time is the larger of its GPU time and the host
time spent issuing it. This isolates the second: the fused kernels are replaced by stubs that only allocate
their outputs, so what is timed is ``QRLoraLinear``'s checks, the strategy choice, and either the eager
``autograd.Function`` route (what eager mode uses) or the ``torch.library`` custom-op route (what
``torch.compile`` traces), forward and backward, beside a frozen ``nn.Linear``. The kernels' own launch cost
(Triton's launcher, a few microseconds each) comes on top on a GPU.
"""
import pytest
import torch
from torch import nn

from qrlora_kernels import ops
from qrlora_kernels.layer import QRLoraLinear

T, K, N, R_ = 8, 64, 64, 8


class _StubKernels:
    """The kernel host functions' signatures, returning uninitialised outputs of the right shapes."""

    @staticmethod
    def project(a, basis, **kw):
        return a.new_empty((a.shape[0], basis.shape[1]), dtype=torch.float32)

    @staticmethod
    def lowrank_matmul(a, b, p, lam, u, bias=None, **kw):
        return a.new_empty((a.shape[0], b.shape[1]))

    @staticmethod
    def project_and_reduce(dy, Q, s, num_adapters=1, **kw):
        return s.new_empty(s.shape), s.new_empty((num_adapters, s.shape[1]))

    class utils:
        @staticmethod
        def nvtx_range(name, device):
            import contextlib
            return contextlib.nullcontext()


def _layer():
    layer = QRLoraLinear.from_linear(nn.Linear(K, N), rank=R_, backend="triton", strategy="lowrank")
    with torch.no_grad():
        layer.lam.normal_()
    return layer


@pytest.fixture
def stubbed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # functional's CPU check; no kernel runs
    monkeypatch.setattr(ops, "_kernels", lambda: _StubKernels)


def _step(module, x, dy):
    def step():
        y = module(x)
        y.backward(dy)
        return y
    return step


@pytest.mark.parametrize("route", ["frozen_linear", "eager_function", "custom_op"])
def test_host_time_forward_backward(benchmark, stubbed, monkeypatch, route):
    benchmark.group = f"host time per forward+backward, {N}x{K}, T={T}, r={R_} (kernels stubbed)"
    x = torch.randn(T, K, requires_grad=True)
    dy = torch.randn(T, N)
    if route == "frozen_linear":
        module = nn.Linear(K, N).requires_grad_(False)
    else:
        module = _layer()
        if route == "custom_op":  # the route torch.compile traces, called eagerly
            monkeypatch.setattr(ops, "lowrank_linear", lambda *args: ops.lowrank_forward(*args)[0])
    y = benchmark(_step(module, x, dy))
    assert y.shape == (T, N) and x.grad is not None
    if route != "frozen_linear":
        assert module.lam.grad is not None and module.lam.grad.shape == (R_,)
