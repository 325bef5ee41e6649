"""The one tolerance helper the tests share, plus output poisoning.

Every numeric test compares against a float64 reference by *relative* error
(``||actual - expected|| / ||expected||``, Frobenius norms, computed in float64),
within the bands the issues give. Kernels that take an ``out=`` tensor are
handed a NaN-poisoned buffer so a test can check that every element was written.
"""
from __future__ import annotations

import torch

# Relative-error bands from the issues (fused-kernel issue, "Tests").
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,      # with input_precision="ieee"
    "tf32": 5e-4,             # float32 with tf32 tensor cores
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,     # GPU only: the Triton interpreter has no bf16
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error in float64; 0 for two empty tensors, inf on NaN."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: got {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    denom = torch.linalg.vector_norm(e).item()
    num = torch.linalg.vector_norm(a - e).item()
    if denom == 0.0:
        return num
    return num / denom


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float | None = None,
                     *, dtype=None, name: str = "tensor") -> float:
    """Assert ``rel_error(actual, expected) <= rel``.

    ``rel`` defaults to the band for ``dtype`` (or ``actual.dtype``). Returns the error
    so that tests can also log it.
    """
    if rel is None:
        rel = REL_TOL[dtype if dtype is not None else actual.dtype]
    err = rel_error(actual, expected)
    if not err <= rel:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {rel:.1e} "
                             f"(shape {tuple(actual.shape)}, dtype {actual.dtype})")
    return err


def poisoned(shape, *, dtype, device) -> torch.Tensor:
    """A buffer filled with NaN (floating) so unwritten elements are detectable."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_all_written(t: torch.Tensor, name: str = "output") -> None:
    """Every element of a poisoned buffer was overwritten with a finite value."""
    bad = ~torch.isfinite(t)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {t.numel()} elements were not written "
                             f"(first at index {idx})")
