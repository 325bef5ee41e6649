"""build_basis / basis_from_pivots / truncate against definitions computed independently with scipy (float64)."""
import numpy as np
import pytest
import scipy.linalg
import torch

from qrlora_kernels.basis import QRLoraBasis, basis_from_pivots, build_bases, build_basis, truncate
from qrlora_kernels.testing import assert_rel_close


def _weight(out_features, in_features, dtype=torch.float32):
    # Decaying column scales: a spectrum like a trained weight's, and no near-ties among the pivots.
    scales = torch.logspace(0, -2, in_features, dtype=torch.float64)
    w = torch.randn(out_features, in_features, dtype=torch.float64) * scales[torch.randperm(in_features)]
    return w.to(dtype)


def _scipy_qrcp(weight):
    Q, R, P = scipy.linalg.qr(weight.double().numpy(), mode="economic", pivoting=True)
    return torch.from_numpy(Q), torch.from_numpy(R), torch.from_numpy(P.astype(np.int64))


def _rank_r_approx(Q, R, perm, r):
    """W's rank-r pivoted-QR approximation Q[:, :r] R[:r, argsort(perm)]: invariant to the per-pair signs."""
    return Q[:, :r].double() @ R[:r].double()[:, torch.argsort(perm)]


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (33, 33)])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
def test_diag_rule_matches_definition(shape, tau):
    w = _weight(*shape)
    Qs, Rs, Ps = _scipy_qrcp(w)
    d = torch.diagonal(Rs) ** 2
    fractions = torch.cumsum(d, 0) / d.sum()
    expected_rank = next(i + 1 for i in range(d.numel()) if fractions[i] >= tau)

    basis = build_basis(w, tau=tau, energy="diag")
    assert isinstance(basis, QRLoraBasis)
    assert basis.rank == expected_rank
    assert torch.equal(basis.perm[:expected_rank], Ps[:expected_rank])
    assert basis.energy_captured == pytest.approx(float(fractions[expected_rank - 1]), rel=1e-5)
    assert_rel_close(basis.diag_energy, d / d.sum(), 1e-5, name="diag_energy")
    assert basis.Q.shape == (shape[0], expected_rank) and basis.R.shape == (expected_rank, shape[1])
    assert basis.Q.dtype == w.dtype and basis.R.dtype == w.dtype and basis.perm.dtype == torch.int64
    assert_rel_close(basis.Q @ basis.R, _rank_r_approx(Qs, Rs, Ps, expected_rank), 1e-5, name="Q_r R_r")


@pytest.mark.parametrize("tau", [0.6, 0.9])
def test_frobenius_rule_matches_definition(tau):
    w = _weight(48, 36)
    Qs, Rs, Ps = _scipy_qrcp(w)
    total = w.double().square().sum()
    # 1 - ||R22||^2 / ||W||^2 after k steps = (energy of R's first k rows) / ||W||^2.
    captured = torch.cumsum(Rs.square().sum(1), 0) / total
    expected_rank = next(i + 1 for i in range(captured.numel()) if captured[i] >= tau)

    basis = build_basis(w, tau=tau, energy="frobenius")
    assert basis.rank == expected_rank
    assert basis.energy_captured == pytest.approx(float(captured[expected_rank - 1]), rel=1e-5)
    assert basis.diag_energy.shape == (expected_rank,)
    assert_rel_close(basis.Q @ basis.R, _rank_r_approx(Qs, Rs, Ps, expected_rank), 1e-5, name="Q_r R_r")


@pytest.mark.parametrize("rank", [1, 7, 24])
def test_rank_rule_and_sign_convention(rank):
    w = _weight(24, 31)
    Qs, Rs, Ps = _scipy_qrcp(w)
    basis = build_basis(w, rank=rank)
    assert basis.rank == rank
    assert torch.equal(basis.perm[:rank], Ps[:rank])
    pivot_block = basis.R[:, basis.perm[:rank]]
    assert (torch.diagonal(pivot_block) > 0).all()
    assert torch.count_nonzero(torch.tril(pivot_block, -1)) == 0
    assert_rel_close(basis.Q.t() @ basis.Q, torch.eye(rank), 1e-5, name="Q^T Q")
    assert_rel_close(basis.Q @ basis.R, _rank_r_approx(Qs, Rs, Ps, rank), 1e-5, name="Q_r R_r")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_basis_from_pivots_matches_build_basis(dtype):
    w = _weight(40, 28, dtype)
    basis = build_basis(w, tau=0.9)
    Q, R = basis_from_pivots(w, basis.perm[:basis.rank])
    band = 1e-6 if dtype == torch.float32 else 1e-12
    # Compared elementwise (not up to sign): the sign convention makes the basis unique.
    assert_rel_close(Q, basis.Q, band * 10, name="Q")
    assert_rel_close(R, basis.R, band * 10, name="R")


def test_half_precision_weight_is_factorised_in_float32():
    w = _weight(32, 24, torch.float32)
    basis16 = build_basis(w.to(torch.bfloat16), rank=6)
    basis32 = build_basis(w.to(torch.bfloat16).float(), rank=6)
    assert basis16.Q.dtype == torch.bfloat16
    assert torch.equal(basis16.perm, basis32.perm)
    assert torch.equal(basis16.Q, basis32.Q.to(torch.bfloat16))


def test_truncate_equals_smaller_factorisation():
    w = _weight(36, 30)
    full = build_basis(w, tau=1.0, energy="diag")
    small = truncate(full, 5)
    direct = build_basis(w, rank=5)
    assert small.rank == 5
    assert_rel_close(small.Q, direct.Q, 1e-5, name="Q")
    assert_rel_close(small.R, direct.R, 1e-5, name="R")
    assert small.energy_captured == pytest.approx(float(full.diag_energy[:5].sum()))

    by_rank = build_basis(w, rank=12)
    from_rank = truncate(by_rank, 5, energy="frobenius")
    assert from_rank.energy_captured == pytest.approx(direct.energy_captured, rel=1e-5)


@pytest.mark.parametrize("dtype, scales", [
    (torch.float32, [1e-30, 1e-25, 1e-20, 1e-10, 1e10, 1e18, 1e19, 1e20, 1e30]),
    (torch.float64, [1e-300, 1e-160, 1e160, 1e300]),
], ids=["float32", "float64"])
@pytest.mark.parametrize("rule", [{"tau": 0.9}, {"tau": 0.9, "energy": "frobenius"}, {"rank": 6}],
                         ids=["diag", "frobenius", "rank"])
def test_ranks_and_energies_do_not_depend_on_the_weight_scale(rule, dtype, scales):
    """c * W gets W's rank, energies and pivots (and c * R) for every c its dtype represents. Squared in float32,
    R's diagonal overflowed from |W| ~ 1e18 (tau=0.9 gave rank 8 and energy 0, from 1e19 rank 1 and NaN) and
    vanished below ~1e-23 (a weight at 1e-25 was refused as "all zeros")."""
    w = _weight(40, 32, torch.float64)
    ref = build_basis(w.to(dtype), **rule)
    for c in scales:
        got = build_basis((w * c).to(dtype), **rule)
        assert got.rank == ref.rank, f"c={c:g}"
        assert torch.equal(got.perm[:got.rank], ref.perm[:ref.rank]), f"c={c:g}"
        assert got.energy_captured == pytest.approx(ref.energy_captured, rel=1e-5), f"c={c:g}"
        assert got.diag_energy.dtype == ref.diag_energy.dtype
        assert_rel_close(got.diag_energy, ref.diag_energy, 1e-5, name=f"diag_energy at c={c:g}")
        assert_rel_close(got.R.double() / c, ref.R.double(), 1e-5, name=f"R / c at c={c:g}")
        assert torch.isfinite(got.Q).all()
        if "rank" in rule:  # truncating a rank-k basis under the frobenius rule: its energies again
            small, ref_small = truncate(got, 3, energy="frobenius"), truncate(ref, 3, energy="frobenius")
            assert small.energy_captured == pytest.approx(ref_small.energy_captured, rel=1e-5), f"c={c:g}"
        if "energy" not in rule and "rank" not in rule:  # the normalised energies a global budget compares
            deferred, ref_deferred = build_bases([(w * c).to(dtype), w.to(dtype)], tau=1.0, defer=True)
            assert_rel_close(deferred.diag_energy, ref_deferred.diag_energy, 1e-5, name=f"budget energies c={c:g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_diag_ranks_follow_the_documented_rule_in_the_factorisation_dtype(dtype):
    """The diag rule's r is the smallest with cumsum(R_ii^2)[r-1] >= tau * sum(R_ii^2), evaluated in the dtype R
    is computed in (float32 for float32 and half weights), as every earlier version did: a Trainer checkpoint's lam
    shapes come from these ranks, so near-ties and tau = 1 must not move when the weights are in range."""
    from qrlora_kernels import qrcp
    torch.manual_seed(3)
    for shape in [(96, 80), (64, 160)]:
        w = (torch.randn(*shape, dtype=torch.float64)
             * torch.logspace(0, -3, shape[1], dtype=torch.float64)[torch.randperm(shape[1])]).to(dtype)
        d = qrcp(w.to(torch.float64 if dtype == torch.float64 else torch.float32), mode="r").R.diagonal().square()
        cumulative = torch.cumsum(d, 0)
        taus = [0.5, 0.9, 0.99, 0.999999, 1.0] + [float(cumulative[i] / cumulative[-1]) for i in (3, 17, 40)]
        for tau in taus:
            expected = min(int((cumulative < tau * cumulative[-1]).sum()) + 1, d.numel())
            assert build_basis(w, tau=tau).rank == expected, (shape, tau)


def test_bad_inputs():
    w = _weight(8, 6)
    with pytest.raises(TypeError, match="exactly one of tau"):
        build_basis(w)
    with pytest.raises(TypeError, match="exactly one of tau"):
        build_basis(w, tau=0.9, rank=2)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        build_basis(w, tau=1.5)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min"):
        build_basis(w, rank=7)
    with pytest.raises(ValueError, match="energy must be one of"):
        build_basis(w, tau=0.9, energy="spectral")
    with pytest.raises(ValueError, match="must be 2-D"):
        build_basis(w[0], rank=1)
    with pytest.raises(TypeError, match="floating-point"):
        build_basis(torch.ones(4, 4, dtype=torch.int64), rank=1)
    with pytest.raises(ValueError, match="all zeros"):
        build_basis(torch.zeros(4, 4), rank=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        build_basis(torch.full((4, 4), float("nan")), rank=1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        build_basis(torch.full((4, 4), float("inf")), tau=0.9, energy="frobenius")
    with pytest.raises(ValueError, match="weight is on the meta device"):
        build_basis(torch.empty(4, 4, device="meta"), tau=0.9)
    with pytest.raises(ValueError, match="repeated"):
        basis_from_pivots(w, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"pivots must lie in \[0, 6\)"):
        basis_from_pivots(w, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cannot truncate a rank-3 basis to rank 4"):
        truncate(build_basis(w, rank=3), 4)


@pytest.mark.parametrize("rule", [{"tau": 0.9, "energy": "diag"}, {"tau": 0.8, "energy": "frobenius"}, {"rank": 7}])
def test_build_bases_batches_repeated_shapes_and_equals_build_basis(rule, monkeypatch):
    import qrlora_kernels.qr as qr

    shapes = [(40, 24), (24, 40), (40, 24), (33, 33), (40, 24), (24, 40)]
    weights = [_weight(*s) for s in shapes]
    batches = []
    original = qr.qrcp_batched

    def recording(A, **kw):
        batches.append(tuple(A.shape))
        return original(A, **kw)
    monkeypatch.setattr(qr, "qrcp_batched", recording)
    done = []
    bases = build_bases(weights, names=[f"m{i}" for i in range(len(weights))], on_done=done.append, **rule)
    # One batch per repeated shape; the singleton (33, 33) is factorised alone.
    assert sorted(batches) == [(2, 24, 40), (3, 40, 24)]
    assert sum(done) == len(weights)
    for w, got in zip(weights, bases):
        ref = build_basis(w, **rule)
        assert got.rank == ref.rank and torch.equal(got.perm, ref.perm)
        assert_rel_close(got.Q.double() @ got.R.double(), ref.Q.double() @ ref.R.double(), 1e-6)
        assert got.energy_captured == pytest.approx(ref.energy_captured, rel=1e-6)
        assert got.Q.shape == (w.shape[0], got.rank) and got.R.shape == (got.rank, w.shape[1])


@pytest.mark.parametrize("rule", [{"tau": 0.9, "energy": "diag"}, {"tau": 0.8, "energy": "frobenius"}, {"rank": 30},
                                  {"tau": 1.0, "defer": True}, {"tau": 0.9, "method": "randomized"}])
def test_bases_do_not_depend_on_how_weights_are_grouped(rule):
    """With 2 threads a batch is factored one weight per thread and a lone weight with both threads in
    its panel. The bases must not depend on that, to the bit: a distributed ``apply_qrlora`` gives each
    rank a different subset of a shape's weights than one process has, and promises identical bases."""
    weights = [_weight(384, 320) for _ in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = build_bases(weights, **rule)
        apart = build_bases(weights[:1], **rule) + build_bases(weights[1:], **rule)
    finally:
        torch.set_num_threads(before)
    for i, (a, b) in enumerate(zip(together, apart)):
        assert a.rank == b.rank and a.energy_captured == b.energy_captured, f"weight {i}"
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"weight {i}: a basis tensor depends on the grouping"


@pytest.mark.parametrize("rule", [{"tau": 0.9, "energy": "diag"}, {"tau": 0.8, "energy": "frobenius"}, {"rank": 30}])
def test_geqp3_bases_do_not_depend_on_the_thread_count(rule):
    """torchrun gives each rank one thread (OMP_NUM_THREADS=1) while a single process usually has
    several: a distributed ``apply_qrlora`` promises that process's bases to the bit, Q included."""
    weights = [_weight(384, 320) for _ in range(2)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = build_bases(weights, **rule)
        torch.set_num_threads(3)
        three = build_bases(weights[:1], **rule) + build_bases(weights[1:], **rule)
    finally:
        torch.set_num_threads(before)
    for i, (a, b) in enumerate(zip(one, three)):
        assert a.rank == b.rank, f"weight {i}"
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"weight {i}: a basis tensor depends on the thread count"


@pytest.mark.parametrize("rule", [{"tau": 0.9}, {"tau": 0.8, "energy": "frobenius"}, {"rank": 12}])
def test_randomized_pivoting_gives_a_valid_reproducible_basis(rule):
    """method="randomized": Q_r orthonormal, R_r = Q_r^T W (rows of a Householder R), the sign convention,
    a rank and energy close to geqp3's, the same basis from the stored pivots, and the same result twice."""
    w = _weight(48, 40)
    got = build_basis(w, method="randomized", **rule)
    paper = build_basis(w, **rule)
    Q, R, W = got.Q.double(), got.R.double(), w.double()
    assert_rel_close(Q.t() @ Q, torch.eye(got.rank, dtype=torch.float64), 1e-5, name="Q^T Q")
    assert_rel_close(R, Q.t() @ W, 1e-5, name="R_r")
    assert bool((torch.diagonal(got.R[:, got.perm[:got.rank]]) > 0).all())
    assert abs(got.rank - paper.rank) <= 2 and got.energy_captured == pytest.approx(paper.energy_captured, abs=0.02)
    Q_p, R_p = basis_from_pivots(w, got.perm[:got.rank])
    assert_rel_close(Q_p.double(), Q, 1e-5, name="Q from pivots")
    again = build_basis(w, method="randomized", **rule)
    assert torch.equal(again.Q, got.Q) and torch.equal(again.perm, got.perm)
    with pytest.raises(ValueError, match="method must be one of"):
        build_basis(w, method="svd", **rule)


def test_build_bases_clamps_rank_per_shape_and_names_bad_weights(monkeypatch):
    import qrlora_kernels.qr as qr

    small, big = _weight(5, 4), _weight(30, 20)
    assert [b.rank for b in build_bases([small, big, big], rank=10)] == [4, 10, 10]
    bad = _weight(30, 20)
    bad[3, 7] = float("nan")
    alone = []
    original = qr.qrcp

    def recording(A, **kw):
        alone.append(A)
        return original(A, **kw)
    monkeypatch.setattr(qr, "qrcp", recording)
    with pytest.raises(ValueError, match=r"^layer.2: qrcp: A contains NaN or Inf \(first in column 7\)"):
        build_bases([big, _weight(30, 20), bad], tau=0.9, names=["layer.0", "layer.1", "layer.2"])
    # Naming the bad weight took one (refused) call for it alone, not a refactorisation of the good ones.
    assert len(alone) == 1 and bool(torch.isnan(alone[0]).any())
    with pytest.raises(ValueError, match=r"^layer.1: weight is all zeros"):
        build_bases([big, torch.zeros(30, 20)], tau=0.9, names=["layer.0", "layer.1"])
    with pytest.raises(ValueError, match="2 names for 1 weights"):
        build_bases([big], tau=0.9, names=["a", "b"])
    assert build_bases([], tau=0.9) == []


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_deferred_basis_truncates_like_the_full_one(shape):
    from qrlora_kernels.basis import DeferredBasis

    weights = [_weight(*shape), _weight(*shape)]
    deferred = build_bases(weights, tau=1.0, defer=True)
    for w, d in zip(weights, deferred):
        full = build_basis(w, tau=1.0)
        assert isinstance(d, DeferredBasis) and d.rank == full.rank and d.dtype == w.dtype
        assert torch.equal(d.perm, full.perm)
        torch.testing.assert_close(d.diag_energy, full.diag_energy, rtol=1e-6, atol=0)
        for r in (1, 5, 13):
            got, ref = truncate(d, r), truncate(full, r)
            assert got.rank == r and got.Q.shape == ref.Q.shape and got.R.shape == ref.R.shape
            assert_rel_close(got.Q.double(), ref.Q.double(), 1e-5)
            assert_rel_close(got.R.double(), ref.R.double(), 1e-5)
            assert got.energy_captured == pytest.approx(ref.energy_captured, rel=1e-6)
    with pytest.raises(ValueError, match="defer=True needs the diag rule"):
        build_bases(weights, rank=3, defer=True)
    with pytest.raises(ValueError, match="defer=True needs the diag rule with tau and geqp3"):
        build_bases(weights, tau=1.0, defer=True, method="randomized")
    with pytest.raises(ValueError, match="truncate it with energy='diag'"):
        truncate(deferred[0], 2, energy="frobenius")
