"""pytest-benchmark micro-benchmarks of the CPU paths (not part of ``pytest tests``)::

    python -m pytest -q benchmarks/micro --benchmark-only          # or: make micro
    python -m pytest -q benchmarks/micro --benchmark-only --benchmark-compare   # against a saved run

One roberta-base attention projection (768 x 768), T = 256, fp32, through the same providers as
``benchmarks.throughput`` (random non-zero weights, rotated inputs), plus small pivoted QRs. Each benchmark
first checks its result, so a broken path cannot post a fast time.
"""
import pytest
import torch

from benchmarks import providers as P
from qrlora_kernels.testing import REL_TOL, assert_rel_close

N = K = 768
T = 256
RANKS = (16, 422)  # a LoRA-typical rank, and the rank tau = 0.9 gives on real weights (~0.55 x 768)
LAYER_PROVIDERS = ["frozen_linear", "full_ft", "peft_lora", "qrlora_torch_lowrank", "qrlora_torch_merged"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _prepared(name, rank, mode):
    provider = P.PROVIDERS[name]
    case = P.Case(N, K, T, rank, torch.float32, mode)
    module = P.build_module(provider, case)
    xs, dys = P.make_inputs(case, P.buffer_count(case))
    with torch.no_grad():
        assert_rel_close(module(xs[0]), P.reference_output(provider, module, xs[0]), REL_TOL[torch.float32],
                         name=f"{name} output")
    return P.make_step(module, case, xs, dys)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", LAYER_PROVIDERS)
def test_layer_forward(benchmark, name, rank):
    benchmark.group = f"forward 768x768 T={T} r={rank}"
    y = benchmark(_prepared(name, rank, "fwd"))
    assert y.shape == (T, N) and torch.isfinite(y).all()


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", LAYER_PROVIDERS)
def test_layer_forward_backward(benchmark, name, rank):
    benchmark.group = f"forward+backward 768x768 T={T} r={rank}"
    grads = benchmark(_prepared(name, rank, "fwd+bwd"))
    assert grads[0].shape == (T, K) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("rank", [None, 64])
@pytest.mark.parametrize("method", ["geqp3", "randomized"])
def test_qrcp_small(benchmark, method, rank):
    from qrlora_kernels import qrcp
    benchmark.group = "qrcp 512x512"
    A = torch.randn(512, 512)
    result = benchmark(lambda: qrcp(A, rank=rank, method=method))
    k = result.Q.shape[1]
    assert_rel_close(result.Q @ result.R, A[:, result.perm], REL_TOL[torch.float32] * 100 if rank is None else 1.0,
                     name="A[:, perm] = QR")
    assert k == (512 if rank is None else rank)
