"""QRLoraLinear: conversion, drop-in behaviour, merging, serialisation, training, adapters, bad input."""
import copy
import io

import pytest
import torch
from torch import nn

from qrlora_kernels.basis import build_basis, truncate
from qrlora_kernels.layer import QRLoraLinear
from qrlora_kernels.testing import REL_TOL, assert_rel_close


def _linear(in_features=40, out_features=24, bias=True, dtype=torch.float32):
    lin = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(0, -1.5, in_features, dtype=dtype)[torch.randperm(in_features)])
    return lin


def _randomise_lam(layer):
    with torch.no_grad():
        layer.lam.copy_(torch.randn_like(layer.lam))


def _expected_output(layer, x, lam=None):
    """float64: x W0^T + b + x (Q diag(lam) R)^T."""
    lam = layer.lam if lam is None else lam
    w = layer.weight.double() + (layer.Q.double() * lam.double()) @ layer.R.double()
    y = x.double() @ w.t()
    return y + layer.bias.double() if layer.bias is not None else y


def test_drop_in_attributes_and_exact_equality_at_zero():
    lin = _linear(bias=True)
    layer = QRLoraLinear.from_linear(lin, tau=0.9)
    assert layer.in_features == 40 and layer.out_features == 24
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lam"]
    assert set(dict(layer.named_buffers())) == {"Q", "R", "perm"}
    assert layer.lam.shape == (layer.rank,) and torch.count_nonzero(layer.lam) == 0
    assert layer.perm.shape == (40,) and layer.perm.dtype == torch.int64
    assert sorted(layer.perm.tolist()) == list(range(40))
    x = torch.randn(3, 5, 40)
    for strategy in ("lowrank", "merged"):
        layer.strategy = strategy
        assert torch.equal(layer(x), lin(x)), strategy
    # from_linear leaves the original layer as it was.
    assert lin.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_half_precision_at_zero_is_the_linear_within_one_rounding(dtype, strategy):
    """The README's claim: in half precision a layer at lam = 0 gives nn.Linear's product up to the rounding of
    another GEMM (the merged path computes in float32 and rounds once): about one unit in the last place, within
    torch.testing.assert_close's default tolerance for the dtype."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 80).to(dtype)
    layer = QRLoraLinear.from_linear(lin, tau=0.9)
    layer.backend, layer.strategy = "torch", strategy
    x = torch.randn(4, 16, 96, dtype=dtype)
    with torch.no_grad():
        y, expected = layer(x), lin(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected)
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((y - expected).abs() <= ulp).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_matches_float64_reference(backend):
    layer = QRLoraLinear.from_linear(_linear(33, 17), rank=9)
    layer.backend = backend
    _randomise_lam(layer)
    x = torch.randn(2, 3, 33)
    assert_rel_close(layer(x), _expected_output(layer, x), name="y")


def test_rank_rules_of_from_linear():
    lin = _linear(36, 30)
    for kwargs in ({"tau": 0.9}, {"tau": 0.9, "energy": "frobenius"}, {"rank": 4}, {"tau": 0.9, "method": "randomized"}):
        basis = build_basis(lin.weight, **kwargs)
        layer = QRLoraLinear.from_linear(lin, **{("qr_method" if k == "method" else k): v for k, v in kwargs.items()})
        assert layer.rank == basis.rank
        assert torch.equal(layer.Q, basis.Q) and torch.equal(layer.R, basis.R) and torch.equal(layer.perm, basis.perm)
        assert layer.energy_captured == pytest.approx(basis.energy_captured)
    frob = QRLoraLinear.from_linear(lin, tau=0.9, energy="frobenius")
    assert frob.energy == "frobenius" and frob.tau == 0.9
    assert "rank=" in repr(frob) and "tau=0.9" in repr(frob)


def test_from_basis_with_truncated_and_stored_pivots():
    lin = _linear(32, 24)
    full = build_basis(lin.weight, tau=1.0)
    layer = QRLoraLinear.from_basis(lin, truncate(full, 6), num_adapters=3)
    assert layer.rank == 6 and layer.lam.shape == (3, 6) and layer.num_adapters == 3
    # A (Q, R, pivots[:r]) tuple, as an adapter file would restore it: perm is completed to a permutation.
    short = QRLoraLinear.from_basis(lin, (layer.Q, layer.R, layer.perm[:6]))
    assert torch.equal(short.perm[:6], layer.perm[:6]) and sorted(short.perm.tolist()) == list(range(32))
    with pytest.raises(ValueError, match="do not fit a linear layer"):
        QRLoraLinear.from_basis(lin, (layer.Q.t(), layer.R, layer.perm))


@pytest.mark.parametrize("pivots, match", [
    ([3, 3, 5, 7], "perm repeats column index 3"),
    (list(range(31)) + [0], "perm repeats column index 0"),
    ([-1, 0, 1, 2], r"perm holds column index -1, outside \[0, in_features\) = \[0, 32\)"),
    ([99, 0, 1, 2], r"perm holds column index 99, outside \[0, in_features\) = \[0, 32\)"),
], ids=["repeated", "repeated-full-length", "negative", "beyond-in_features"])
def test_from_basis_refuses_pivots_that_are_not_distinct_columns(pivots, match):
    """perm must hold distinct column indices (a permutation when it has in_features entries): a repeated pivot
    used to give a layer whose perm had 35 entries for 32 columns (saved, then refused on loading), a -1 was
    kept as it was, and an index beyond in_features was a bare IndexError."""
    lin = _linear(32, 24)
    basis = build_basis(lin.weight, rank=4)
    with pytest.raises(ValueError, match=match):
        QRLoraLinear.from_basis(lin, (basis.Q, basis.R, torch.tensor(pivots)))
    with pytest.raises(TypeError, match="perm must hold integer column indices, got dtype torch.float32"):
        QRLoraLinear.from_basis(lin, (basis.Q, basis.R, basis.perm.float()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["Q", "R"])
def test_from_basis_refuses_a_non_finite_basis(which, bad):
    lin = _linear(32, 24)
    Q, R, perm = build_basis(lin.weight, rank=4)[:3]
    Q, R = Q.clone(), R.clone()
    (Q if which == "Q" else R)[1, 2] = bad
    with pytest.raises(ValueError, match=f"the basis's {which} contains NaN or Inf"):
        QRLoraLinear.from_basis(lin, (Q, R, perm))
    if which == "R":  # a layer that keeps Q only drops R: nothing of it reaches the layer
        assert QRLoraLinear.from_basis(lin, (Q, R, perm), store_r=False).R is None


def test_merge_unmerge_round_trip_and_to_linear():
    lin = _linear(40, 24)
    layer = QRLoraLinear.from_linear(lin, tau=0.95)
    _randomise_lam(layer)
    x = torch.randn(7, 40)
    before = layer(x)
    original_weight = layer.weight.detach().clone()
    assert_rel_close(layer.delta_weight(),
                     (layer.Q.double() * layer.lam.double()) @ layer.R.double(), name="delta_weight")

    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert_rel_close(layer.weight, original_weight.double() + layer.delta_weight().double(), name="merged weight")
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert_rel_close(layer(x), before.double(), name="merged forward")
    # The original nn.Linear shares the weight storage and must not see the merge.
    assert torch.equal(lin.weight, original_weight)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()

    layer.unmerge()
    assert not layer.merged
    assert_rel_close(layer.weight, original_weight, name="unmerged weight")
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()

    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    assert_rel_close(plain(x), before.double(), name="to_linear forward")
    # Frozen like the layer's own weight and bias (nn.Linear's default would make them trainable).
    assert not plain.weight.requires_grad and not plain.bias.requires_grad


@pytest.mark.parametrize("store_r", [True, False])
def test_state_dict_round_trip_deepcopy_and_to(store_r):
    layer = QRLoraLinear.from_linear(_linear(24, 20), rank=5, store_r=store_r)
    _randomise_lam(layer)
    x = torch.randn(4, 24)
    expected = layer(x)

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = QRLoraLinear(24, 20, 5, store_r=store_r)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(x), expected)
    assert ("R" in layer.state_dict()) is store_r and (fresh.R is None) is not store_r

    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), expected)
    assert twin.lam.data_ptr() != layer.lam.data_ptr()

    double = copy.deepcopy(layer).to(torch.float64)
    assert double.weight.dtype == double.Q.dtype == double.lam.dtype == torch.float64
    assert double.perm.dtype == torch.int64
    assert_rel_close(double(x.double()), expected, REL_TOL[torch.float32], name="float64 copy")


def test_state_dict_without_the_basis_needs_the_same_pivots():
    """A state_dict that lacks Q and R (what Hugging Face checkpoints hold) keeps the layer's basis: its lam is
    loaded when its leading pivots are the layer's, and refused, naming the layer, when they are not."""
    layer = QRLoraLinear.from_linear(_linear(24, 20), rank=5)
    _randomise_lam(layer)
    x = torch.randn(4, 24)
    state = {k: v for k, v in layer.state_dict().items() if k not in ("Q", "R")}
    same = copy.deepcopy(layer)
    nn.init.normal_(same.lam)
    same.load_state_dict(state)  # strict: with matching pivots the basis is not missing
    assert torch.equal(same(x), layer(x))
    without_perm = {k: v for k, v in state.items() if k != "perm"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "Q", "R", "perm"'):  # no pivots to check
        same.load_state_dict(without_perm)

    other = nn.Sequential(QRLoraLinear.from_linear(_linear(24, 20), rank=5))  # another weight: other pivots
    assert not torch.equal(other[0].perm[:5], layer.perm[:5])
    before = other[0].lam.detach().clone()
    with pytest.raises(RuntimeError, match=r"0: the state_dict has no Q, R \(Hugging Face .* pivots perm\[:5\] differ"):
        other.load_state_dict({f"0.{k}": v for k, v in state.items()}, strict=False)
    assert torch.equal(other[0].lam, before)  # the layer itself was not changed

    changed = dict(state, weight=state["weight"] * 1.01)  # the same pivots, but another weight than the basis's
    with pytest.raises(RuntimeError, match=r"has no Q, R .* its weight differs from this layer's, from which"):
        same.load_state_dict(changed)
    half = copy.deepcopy(layer).to(torch.bfloat16)  # the float32 state onto the same layer in bfloat16: the same
    half.load_state_dict(state)
    rounded = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    with pytest.raises(RuntimeError, match="its weight differs"):  # it would round the float32 W0 under the basis
        same.load_state_dict(rounded)

    other[0].load_state_dict(layer.state_dict())  # with its basis, a state_dict replaces the layer's whole
    assert torch.equal(other[0](x), layer(x))


def test_bf16_autocast_on_cpu():
    layer = QRLoraLinear.from_linear(_linear(32, 24), rank=8)
    _randomise_lam(layer)
    x = torch.randn(6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_rel_close(y, _expected_output(layer, x), REL_TOL[torch.bfloat16], name="y (bf16 autocast)")
    y.float().square().sum().backward()
    assert layer.lam.grad.dtype == torch.float32 and torch.isfinite(layer.lam.grad).all()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_changes_only_lam(backend):
    torch.manual_seed(0)
    model = nn.Sequential(QRLoraLinear.from_linear(_linear(32, 24), tau=0.9), nn.Tanh(),
                          QRLoraLinear.from_linear(_linear(24, 16), tau=0.9))
    for layer in (model[0], model[2]):
        layer.backend = backend
    x = torch.randn(16, 32)
    # A reachable target: the same network with other coefficients.
    teacher = copy.deepcopy(model)
    for layer in (teacher[0], teacher[2]):
        _randomise_lam(layer)
    with torch.no_grad():
        target = teacher(x)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("lam")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for key, value in model.state_dict().items():
        if key.endswith("lam"):
            assert torch.count_nonzero(value) > 0
        else:
            assert torch.equal(value, frozen[key]), key


def test_multi_adapter_rows_and_batches():
    layer = QRLoraLinear.from_linear(_linear(24, 20), rank=6)
    assert layer.add_adapter() == 1 and layer.add_adapter() == 2
    assert layer.lam.shape == (3, 6)
    _randomise_lam(layer)
    x = torch.randn(3, 4, 24)
    ids = torch.tensor([2, 0, 1])
    y = layer(x, adapter_ids=ids)
    for b in range(3):
        assert_rel_close(y[b], _expected_output(layer, x[b], layer.lam[ids[b]]), name=f"sequence {b}")
    # Without ids the active adapter serves the whole batch.
    layer.active_adapter = 1
    assert_rel_close(layer(x), _expected_output(layer, x, layer.lam[1]), name="active adapter")
    with pytest.raises(ValueError, match="merge\\(\\) needs a single adapter"):
        layer.merge()
    with pytest.raises(ValueError, match="adapter id 3 is out of range for 3 adapter"):
        layer(x, adapter_ids=torch.tensor([0, 3, 1]))
    # Serving code runs under inference_mode, whose tensors have no version counter to cache the ids' range by.
    with torch.inference_mode():
        served = layer(x, adapter_ids=torch.tensor([2, 0, 1]))
        bad = torch.tensor([0, 1, 1])
        layer(x, adapter_ids=bad)
        bad[1] = 5  # rewritten in place: must be measured again, not served from the cache
        with pytest.raises(ValueError, match="adapter id 5 is out of range"):
            layer(x, adapter_ids=bad)
    assert torch.equal(served, y.detach())
    kept = layer.lam[0].detach().clone()
    layer.set_num_adapters(1)
    assert layer.lam.shape == (6,) and torch.equal(layer.lam.detach(), kept)
    layer.merge()
    assert layer.merged


def test_adding_adapters_keeps_the_lam_parameter_so_an_earlier_optimizer_trains_it():
    """add_adapter and set_num_adapters reshape lam in place. An optimizer built before adding (the order of an
    earlier README) trains the live lam; one that has already stepped holds state of the old shape and fails
    loudly at its next step, instead of stepping a Parameter the layer no longer uses."""
    layer = QRLoraLinear.from_linear(_linear(24, 20), rank=6)
    lam = layer.lam
    opt = torch.optim.Adam([layer.lam], lr=1e-1)
    layer.add_adapter()
    layer.set_num_adapters(3)
    assert layer.lam is lam and lam.shape == (3, 6) and lam.requires_grad and lam.grad is None
    x = torch.randn(3, 4, 24)
    layer(x, adapter_ids=torch.tensor([0, 1, 2])).square().mean().backward()
    opt.step()
    assert torch.count_nonzero(layer.lam.detach()) == 18  # every adapter's row moved
    opt.zero_grad()
    layer.add_adapter()
    assert layer.lam is lam and lam.grad is None and torch.count_nonzero(lam.detach()[3]) == 0
    layer(x, adapter_ids=torch.tensor([3, 1, 2])).square().mean().backward()
    with pytest.raises(RuntimeError, match="size|shape"):
        opt.step()  # Adam's moments are 3 x 6


def test_bad_arguments():
    lin = _linear(8, 6)
    with pytest.raises(TypeError, match="exactly one of tau"):
        QRLoraLinear.from_linear(lin)
    with pytest.raises(TypeError, match="exactly one of tau"):
        QRLoraLinear.from_linear(lin, tau=0.9, rank=2)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        QRLoraLinear.from_linear(nn.Conv1d(2, 2, 1), rank=1)
    with pytest.raises(ValueError, match="method must be one of"):
        QRLoraLinear.from_linear(lin, rank=2, qr_method="svd")
    with pytest.raises(ValueError, match="rank 7 exceeds"):
        QRLoraLinear(8, 6, 7)
    with pytest.raises(ValueError, match="backend must be one of"):
        QRLoraLinear(8, 6, 2, backend="cuda")
    # Checked at construction (it used to fail only at the first forward), naming the valid strategies.
    with pytest.raises(ValueError, match=r"strategy must be one of \('lowrank', 'merged', 'auto'\) or None, "
                                         r"got 'bogus'"):
        QRLoraLinear(8, 6, 2, strategy="bogus")
    with pytest.raises(ValueError, match="strategy must be one of"):
        QRLoraLinear.from_linear(lin, rank=2, strategy="fast")
    assert QRLoraLinear(8, 6, 2, strategy="auto").strategy == "auto"
    layer = QRLoraLinear.from_linear(lin, rank=2)
    with pytest.raises(ValueError, match="x has last dimension 9 but weight has in_features 8"):
        layer(torch.randn(3, 9))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(3, 8, dtype=torch.int64))


# ------------------------------------------------------------------ store_r=False: Q only, R = Q^T W0

def test_store_r_false_keeps_q_only_and_matches_the_full_layer():
    lin = _linear(40, 24)
    full = QRLoraLinear.from_linear(lin, tau=0.9)
    half = QRLoraLinear.from_linear(lin, tau=0.9, store_r=False)
    assert half.R is None and half.store_r is False and "store_r=False" in repr(half)
    assert set(dict(half.named_buffers())) == {"Q", "perm"} and "R" not in half.state_dict()
    assert half.rank == full.rank and torch.equal(half.Q, full.Q) and torch.equal(half.perm, full.perm)
    # The identity the option rests on: a pivoted QR's leading rows of R are Q^T W0 (W0's column order).
    assert_rel_close(half.basis_r(), full.R.double(), 1e-6, name="Q^T W0 against R")
    x = torch.randn(3, 5, 40)
    assert_rel_close(half(x), lin(x).double(), 1e-6, name="lam = 0")  # the linear layer, to one rounding
    _randomise_lam(full)
    with torch.no_grad():
        half.lam.copy_(full.lam)
    for backend in ("torch", "triton"):
        for strategy in ("lowrank", "merged"):
            half.backend, half.strategy = backend, strategy
            assert_rel_close(half(x), _expected_output(full, x), name=f"y ({backend}, {strategy})")
    assert_rel_close(half.delta_weight(), full.delta_weight().double(), 1e-6, name="delta_weight")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_store_r_false_trains_like_the_full_layer(backend):
    lin = _linear(32, 24)
    layers = [QRLoraLinear.from_linear(lin, rank=10, store_r=s, backend=backend) for s in (True, False)]
    x = torch.randn(6, 32)
    target = torch.randn(6, 24)
    for layer in layers:
        opt = torch.optim.SGD([layer.lam], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(layer(x), target).backward()
            opt.step()
    assert torch.count_nonzero(layers[1].lam) == 10
    assert_rel_close(layers[1].lam, layers[0].lam.double(), 1e-5, name="lam after 3 steps")
    assert layers[1].weight.grad is None and layers[1].Q.grad is None


def test_store_r_false_merge_unmerge_and_to_linear():
    lin = _linear(40, 24)
    layer = QRLoraLinear.from_linear(lin, tau=0.95, store_r=False)
    with torch.no_grad():
        layer.lam.copy_(0.3 * torch.randn_like(layer.lam))
    x = torch.randn(7, 40)
    before, delta = layer(x), layer.delta_weight()
    original_weight = layer.weight.detach().clone()
    layer.merge()
    assert_rel_close(layer(x), before.double(), name="merged forward")
    assert_rel_close(layer.delta_weight(), delta.double(), name="delta_weight while merged")  # from W_eff
    assert_rel_close(layer.to_linear()(x), before.double(), name="to_linear while merged")
    layer.unmerge()
    assert_rel_close(layer.weight, original_weight, name="unmerged weight")
    assert torch.equal(lin.weight, original_weight)

    # lam = -1 removes a direction of W0 that a merged Q-only layer cannot get back: refused, nothing changed.
    with torch.no_grad():
        layer.lam[3] = -1.0
    layer.merge()
    merged = layer.weight.detach().clone()
    message = r"cannot recover W0 from this merged store_r=False layer accurately: lam\[3\] = -1"
    with pytest.raises(ValueError, match=message):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.weight, merged)
    with pytest.raises(ValueError, match=message):  # not a silent inf / NaN
        layer.delta_weight()
    # The error grows like 1 / |1 + lam|: lam = -2 (factor 1) unmerges as accurately as lam = 0.
    with torch.no_grad():
        layer.lam[3] = -2.0
    layer.weight = nn.Parameter(original_weight.clone(), requires_grad=False)
    layer.merged = False
    layer.merge()
    layer.unmerge()
    assert_rel_close(layer.weight, original_weight, name="unmerged weight at lam = -2")
    full = QRLoraLinear.from_linear(lin, tau=0.95)  # a layer with R undoes the same merge
    with torch.no_grad():
        full.lam.copy_(layer.lam)
    full.merge()
    full.unmerge()
    assert_rel_close(full.weight, original_weight, name="store_r=True unmerge at lam = -1")


def test_store_r_false_errors():
    # A state_dict with R does not fit a layer without it (the reverse: test_store_r_false_state_dict_without_q...).
    full = QRLoraLinear.from_linear(_linear(24, 20), rank=5)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "R"'):
        QRLoraLinear(24, 20, 5, store_r=False).load_state_dict(full.state_dict())
    with pytest.raises(TypeError, match="store_r must be a bool, got 'no'"):
        QRLoraLinear(24, 20, 5, store_r="no")
    basis = build_basis(_linear(24, 20).weight, rank=5)
    with pytest.raises(ValueError, match="the basis has no R; pass store_r=False"):
        QRLoraLinear.from_basis(_linear(24, 20), (basis.Q, None, basis.perm))
    assert QRLoraLinear.from_basis(_linear(24, 20), (basis.Q, None, basis.perm), store_r=False).R is None


def test_store_r_false_state_dict_without_q_needs_the_same_pivots():
    """A Hugging Face checkpoint of a Q-only layer holds neither Q nor R: loaded like a full layer's."""
    lin = _linear(24, 20)
    layer = QRLoraLinear.from_linear(lin, rank=5, store_r=False)
    _randomise_lam(layer)
    state = {k: v for k, v in layer.state_dict().items() if k != "Q"}
    same = copy.deepcopy(layer)
    nn.init.normal_(same.lam)
    same.load_state_dict(state)  # strict: Q is not missing
    assert torch.equal(same.lam, layer.lam)
    other = QRLoraLinear.from_linear(_linear(24, 20), rank=5, store_r=False)
    with pytest.raises(RuntimeError, match=r"has no Q \(Hugging Face .* pivots perm\[:5\] differ"):
        other.load_state_dict(state)
    # A Q-only state_dict onto a layer that keeps R: its Q is loaded and the layer's R kept, when the pivots match;
    # otherwise the message names what is absent and why.
    full = QRLoraLinear.from_linear(lin, rank=5)
    full_r = full.R.clone()
    full.load_state_dict(layer.state_dict())
    assert torch.equal(full.R, full_r) and torch.equal(full.lam, layer.lam)
    with pytest.raises(RuntimeError, match=r"has no R \(it comes from a layer built with store_r=False.* differ"):
        QRLoraLinear.from_linear(_linear(24, 20), rank=5).load_state_dict(layer.state_dict())


@pytest.mark.parametrize("adapter", [True, False, 1.0, torch.tensor(1)], ids=["True", "False", "float", "tensor"])
def test_an_adapter_index_must_be_an_int(adapter):
    """to_linear(True) indexed lam with a bool (a new axis) and failed as a broadcasting RuntimeError."""
    for num_adapters in (1, 3):
        layer = QRLoraLinear.from_linear(_linear(8, 6), rank=2, num_adapters=num_adapters)
        for call in (layer.to_linear, layer.delta_weight):
            with pytest.raises(TypeError, match="adapter must be an adapter index \\(int\\) or None, got"):
                call(adapter)


def test_a_state_dict_carries_the_merged_state_so_a_load_never_applies_the_update_twice():
    """A merged layer's weight is W0 + dW: its state_dict says so ("merged"), and loading it makes the receiving
    layer merged (and an unmerged one's, unmerged), so the forward adds dW exactly once either way."""
    torch.manual_seed(0)
    source = QRLoraLinear.from_linear(_linear(), rank=9)
    _randomise_lam(source)
    x = torch.randn(3, 40)
    expected = _expected_output(source, x)
    unmerged_state = {k: v.clone() for k, v in source.state_dict().items()}
    assert "merged" not in unmerged_state  # as before the key existed: older state_dicts mean "not merged"
    source.merge()
    merged_state = source.state_dict()
    assert merged_state["merged"].dtype == torch.bool and bool(merged_state["merged"])
    target = QRLoraLinear.from_linear(_linear(), rank=9)  # another W0: the whole state comes from the state_dict
    assert not target.load_state_dict(merged_state).unexpected_keys
    assert target.merged
    assert_rel_close(target(x), expected, 1e-5, name="a merged state_dict into an unmerged layer")
    target.unmerge()
    assert_rel_close(target.weight, unmerged_state["weight"], 1e-5, name="W0 back after unmerge")
    assert_rel_close(target(x), expected, 1e-5, name="unmerged again")
    merged = copy.deepcopy(source)
    assert not merged.load_state_dict(unmerged_state).missing_keys
    assert not merged.merged
    assert_rel_close(merged(x), expected, 1e-5, name="an unmerged state_dict into a merged layer")
    # Without a weight a merged layer keeps its own, which holds the update of its lam: another lam, or an
    # unmerged layer's state, is refused and changes nothing.
    for partial in ({"lam": torch.randn(9)}, {"lam": source.lam.detach().clone()}):
        before = copy.deepcopy(source.state_dict())
        with pytest.raises(RuntimeError, match="the layer is merged and the state_dict (holds another lam|comes "
                                               "from a not merged one), without a weight to match"):
            source.load_state_dict(partial, strict=False)
        assert source.merged and all(torch.equal(v, before[k]) for k, v in source.state_dict().items())
    source.load_state_dict({"lam": source.lam.detach().clone(), "merged": torch.tensor(True)}, strict=False)
    source.load_state_dict({}, strict=False)  # nothing of this layer: nothing to check
    assert source.merged


def test_a_merged_state_dict_without_the_basis_loads_into_a_layer_built_on_the_same_weight():
    """A Hugging Face checkpoint of a merged model leaves Q and R out: its weight is then checked as this layer's
    W0 merged with the state_dict's lam (as merge() forms it), not compared with W0 itself."""
    torch.manual_seed(0)
    lin = _linear()
    source = QRLoraLinear.from_linear(copy.deepcopy(lin), rank=9)
    _randomise_lam(source)
    x = torch.randn(3, 40)
    expected = _expected_output(source, x)
    source.merge()
    state = {k: v for k, v in source.state_dict().items() if k not in ("Q", "R")}
    target = QRLoraLinear.from_linear(copy.deepcopy(lin), rank=9)
    assert not target.load_state_dict(state).missing_keys and target.merged
    assert_rel_close(target(x), expected, 1e-5, name="merged, loaded without the basis")
    target.unmerge()
    assert_rel_close(target.weight, lin.weight, 1e-5, name="W0 after unmerge")
    other = QRLoraLinear.from_linear(copy.deepcopy(lin), rank=9)
    with torch.no_grad():
        other.weight[0, 0] += 1e-3  # another base weight with the same pivots
    with pytest.raises(RuntimeError, match="its weight is not this layer's W0 merged with its lam"):
        other.load_state_dict(state)
    assert not other.merged
    merged_target = QRLoraLinear.from_linear(copy.deepcopy(lin), rank=9)
    merged_target.merge()
    with pytest.raises(RuntimeError, match="this layer is merged .*: unmerge\\(\\) it first"):
        merged_target.load_state_dict({k: v for k, v in target.state_dict().items() if k not in ("Q", "R")})
    with pytest.raises(RuntimeError, match="this layer is merged already: unmerge\\(\\) it first"):
        merged_target.load_state_dict(state)
    two = QRLoraLinear.from_linear(copy.deepcopy(lin), rank=9)
    two.add_adapter()
    with pytest.raises(RuntimeError, match="size mismatch for lam"):
        two.load_state_dict(state)
    # A merged weight formed another way (another GEMM order or Triton config: last-bit differences) loads, and so
    # does one merged in float32 onto the same base held in bfloat16; a different base weight does not.
    jittered = dict(state, weight=state["weight"] * (1 + torch.finfo(torch.float32).eps * torch.randint_like(
        state["weight"], -1, 2)))
    assert not torch.equal(jittered["weight"], state["weight"])
    QRLoraLinear.from_linear(copy.deepcopy(lin), rank=9).load_state_dict(jittered)
    half = QRLoraLinear.from_linear(copy.deepcopy(lin), rank=9).to(torch.bfloat16)  # the same pivots
    half.load_state_dict(state)
    assert half.merged and half.weight.dtype == torch.bfloat16


def test_a_constructed_layer_is_a_linear_layer_until_it_has_a_basis():
    """The constructor (and reset_parameters, which FSDP's meta-device init calls) draws weight and bias as
    nn.Linear does and leaves an empty adapter (lam = 0, Q = R = 0), not uninitialised memory, whose NaN would
    survive lam = 0 (0 * NaN); a plain nn.Linear's state_dict then loads into it (non-strict) as into nn.Linear."""
    import numpy as np
    torch.manual_seed(0)
    for _ in range(3):
        layer = QRLoraLinear(np.int64(24), 16, np.int64(5), num_adapters=2)  # integers as nn.Linear takes them
        assert all(bool(torch.isfinite(t).all()) for t in (layer.weight, layer.bias, layer.Q, layer.R))
        assert not layer.lam.any() and torch.equal(layer.perm, torch.arange(24))
        lin = nn.Linear(24, 16)
        layer.load_state_dict(lin.state_dict(), strict=False)
        x = torch.randn(3, 24)
        assert torch.equal(layer(input=x), lin(input=x))  # nn.Linear's argument name
    trained = QRLoraLinear.from_linear(_linear(), rank=4)
    _randomise_lam(trained)
    trained.reset_parameters()
    assert not trained.lam.any() and not trained.Q.any() and not trained.R.any()
    trained.merge()
    with pytest.raises(ValueError, match="merged layer; unmerge"):
        trained.reset_parameters()


def test_loading_another_weight_without_the_basis_warns_that_the_basis_is_stale():
    """'Convert, then load the pretrained weights' (non-strict) keeps a basis built from the weight before: said.
    The same weight, or a state_dict with the basis or the pivots, loads quietly."""
    import warnings
    lin = _linear()
    layer = QRLoraLinear.from_linear(lin, rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(lin.state_dict(), strict=False)
        layer.load_state_dict(QRLoraLinear.from_linear(lin, rank=4).state_dict())
    other = _linear()
    with pytest.warns(UserWarning, match="replaced the weight W0 but not the QR-LoRA basis"):
        layer.load_state_dict(other.state_dict(), strict=False)
    assert torch.equal(layer.weight, other.weight)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_float16"])
def test_half_precision_casts_keep_lam_in_float32(cast):
    """.half() / .bfloat16() / .to(float16) of a converted layer keep lam's float32 master values (as from_linear
    of a half-precision layer makes them): in half precision an AdamW step of 1e-3 on lam = 1 is lost."""
    layer = QRLoraLinear.from_linear(_linear(), rank=4)
    _randomise_lam(layer)
    values = layer.lam.detach().clone()
    layer.lam.grad = torch.randn_like(layer.lam)
    layer = layer.to(torch.float16) if cast == "to_float16" else getattr(layer, cast)()
    assert layer.weight.dtype in (torch.float16, torch.bfloat16) and layer.Q.dtype == layer.weight.dtype
    assert layer.lam.dtype == torch.float32 and layer.lam.grad.dtype == torch.float32
    assert torch.equal(layer.lam.detach(), values)  # not rounded through half precision
    with torch.no_grad():
        layer.lam.fill_(1.0)
    optimizer = torch.optim.AdamW([layer.lam], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(4, 40, dtype=layer.weight.dtype)).float().square().mean().backward()
        optimizer.step()
    assert (layer.lam.detach() - 1).abs().min() > 1e-3  # every coefficient moved by about 3 steps of 1e-3
    assert layer.double().lam.dtype == torch.float64


def test_half_precision_casts_do_not_round_lam_or_its_grad():
    """.double() then .bfloat16() rounded lam through bf16 (only float32 values were kept exactly), and .half()
    rounded an existing lam.grad through float16."""
    def layer_with_grad():
        layer = QRLoraLinear.from_linear(_linear(), rank=4)
        with torch.no_grad():
            layer.lam.fill_(1.0001)
        layer.lam.grad = torch.full_like(layer.lam, 1.0001e-3)
        return layer
    values, grad = torch.full((4,), 1.0001), torch.full((4,), 1.0001e-3)
    for cast in (lambda m: m.half(), lambda m: m.double().bfloat16()):
        layer = cast(layer_with_grad())
        assert layer.weight.dtype in (torch.float16, torch.bfloat16) and layer.lam.dtype == torch.float32
        assert torch.equal(layer.lam.detach(), values) and torch.equal(layer.lam.grad, grad)


@pytest.mark.parametrize("assign", [False, True])
def test_loading_a_half_precision_state_dict_keeps_lam_in_float32(assign):
    """load_state_dict(..., assign=True) of a bf16 layer's state_dict installed its tensors as they were: lam
    became bf16 (silently: every key matched). Without assign lam was cast, as for every parameter."""
    layer = QRLoraLinear.from_linear(_linear(), rank=4)
    _randomise_lam(layer)
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in layer.state_dict().items()}
    fresh = QRLoraLinear.from_linear(_linear(), rank=4).bfloat16()
    fresh.load_state_dict(half, assign=assign)
    assert fresh.lam.dtype == torch.float32 and isinstance(fresh.lam, nn.Parameter) and fresh.lam.requires_grad
    assert torch.equal(fresh.lam.detach(), half["lam"].float()) and fresh.weight.dtype == torch.bfloat16
    assert half["lam"].dtype == torch.bfloat16  # the caller's dict is left as it was
    # A float64 layer's state_dict into a float32 one built on the meta device (then assigned): lam is float64,
    # as from_linear of a float64 layer makes it; only half-precision lam is widened.
    wide = QRLoraLinear.from_linear(_linear().double(), rank=4).state_dict()
    with torch.device("meta"):
        empty = QRLoraLinear(40, 24, 4)
    empty.load_state_dict(wide, assign=True)
    assert empty.lam.dtype == torch.float64


def test_merging_inside_inference_mode_leaves_a_layer_that_still_trains():
    layer = QRLoraLinear.from_linear(_linear(), rank=4)
    _randomise_lam(layer)
    with torch.inference_mode():
        layer.merge()
    assert not layer.weight.is_inference()
    x = torch.randn(3, 40, requires_grad=True)
    layer(x).sum().backward()  # an inference weight cannot be saved for backward
    with torch.inference_mode():
        layer.unmerge()
    assert not layer.weight.is_inference()
    layer(torch.randn(3, 40)).square().sum().backward()
    assert layer.lam.grad is not None


def test_adapter_indices_and_ids_are_checked_in_every_state():
    """The active adapter is checked in the forward as delta_weight checks it (-1 used the last row, silently);
    a merged layer (one adapter, id 0) checks the ids it is given instead of giving every id its update."""
    layer = QRLoraLinear.from_linear(_linear(), rank=4, num_adapters=3)
    x = torch.randn(2, 5, 40)
    for bad in (-1, 3):
        layer.active_adapter = bad
        with pytest.raises(ValueError, match=f"adapter {bad} is out of range for 3 adapters"):
            layer(x)
    single = QRLoraLinear.from_linear(_linear(), rank=4)
    _randomise_lam(single)
    expected = single(x, adapter_ids=torch.tensor([0, 0]))
    single.merge()
    assert_rel_close(single(x, adapter_ids=torch.tensor([0, 0])), expected, REL_TOL[torch.float32])
    for ids, match in ((torch.tensor([0, 1]), "adapter id 1 is out of range for 1 adapter"),
                       (torch.tensor([0.0, 0.0]), "integer tensor"),
                       (torch.tensor([0, 0, 0]), "expected per-sequence")):
        with pytest.raises((ValueError, TypeError), match=match):
            single(x, adapter_ids=ids)
    with pytest.raises(ValueError, match="adapter 5 is out of range"):
        single.to_linear(adapter=5)


def test_cpu_adapter_ids_rewritten_behind_the_version_counter_are_checked_again():
    """Writes through a shared numpy array do not bump a tensor's version: CPU ids are measured at every call."""
    import numpy as np
    layer = QRLoraLinear.from_linear(_linear(), rank=4, num_adapters=2)
    array = np.zeros(2, dtype=np.int64)
    ids = torch.from_numpy(array)
    layer(torch.randn(2, 3, 40), adapter_ids=ids)
    array[1] = 7
    with pytest.raises(ValueError, match="adapter id 7 is out of range for 2 adapter"):
        layer(torch.randn(2, 3, 40), adapter_ids=ids)


def test_a_numpy_tau_is_kept_as_a_float():
    """Accepted like a Python float, and kept as one: adapter_config.json could not hold a numpy float."""
    import json
    import numpy as np
    layer = QRLoraLinear.from_linear(_linear(), tau=np.float32(0.5))
    assert type(layer.tau) is float and layer.tau == 0.5 and json.dumps(layer.tau)


def test_from_linear_refuses_what_it_takes_from_the_linear():
    with pytest.raises(TypeError, match="take dtype from the linear layer"):
        QRLoraLinear.from_linear(_linear(), rank=4, dtype=torch.float64)
    with pytest.raises(TypeError, match="take bias, device from the linear layer"):
        QRLoraLinear.from_linear(_linear(), rank=4, device="cpu", bias=False)


@pytest.mark.parametrize("strategy", ["lowrank", "merged"])
def test_the_torch_backend_has_second_derivatives(strategy):
    """The torch backend's gradients are differentiable: a gradient penalty through the layer, checked by gradcheck
    in float64 (the Triton backward refuses create_graph=True: test_ops)."""
    torch.manual_seed(0)
    lin = _linear(24, 16, dtype=torch.float64)
    layer = QRLoraLinear.from_linear(lin, rank=16, backend="torch", strategy=strategy)
    _randomise_lam(layer)
    x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)

    def penalty(lam):
        y = torch.func.functional_call(layer, {"lam": lam}, (x,))
        gx, = torch.autograd.grad(torch.tanh(y).sum(), x, create_graph=True)
        return gx.square().sum()
    assert torch.autograd.gradcheck(penalty, (layer.lam.detach().clone().requires_grad_(),))
