"""interpreter_compat: Triton interpreters older than the fix (3.6, the GPU image's) on NumPy >= 2.4.

The first test is the one that fails there without the fix (every K-loop is a ``range`` over a kernel
argument); on Triton 3.8 it passes either way. The others check the wrapper itself on stand-ins.
"""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import qrlora_kernels.kernels.utils as kernel_utils
from qrlora_kernels.kernels import interpreter_compat
from qrlora_kernels.testing import rel_error


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, n_rows, stride, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n_rows):
        acc += tl.load(x_ptr + i * stride + cols)
    tl.store(out_ptr + cols, acc)


@pytest.mark.skipif(not kernel_utils.INTERPRETED, reason="the interpreter is off (a GPU is present)")
def test_an_interpreted_kernel_loops_over_a_scalar_argument():
    x = torch.randn(7, 16)
    out = torch.full((16,), float("nan"))
    index_before = getattr(tl.core.tensor, "__index__", None)
    _sum_rows_kernel[(1,)](x, out, x.shape[0], x.stride(0), BLOCK=16)
    assert not out.isnan().any()
    assert rel_error(out, x.double().sum(0)) <= 1e-6
    assert getattr(tl.core.tensor, "__index__", None) is index_before, "the launch's patch leaked"


class _Handle:
    def __init__(self, data):
        self.data = data


class _Tensor:
    pass


def test_the_wrapper_adds_a_squeezing_index_for_the_launch_only(monkeypatch):
    import numpy as np

    calls = []

    def original(tensor, scope):
        calls.append(tensor)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", original)
    monkeypatch.setattr(interpreter_compat, "_numpy_refuses_array_to_scalar", lambda: True)
    assert interpreter_compat.apply()
    wrapped = interpreter._patch_lang_tensor
    assert wrapped is not original
    assert interpreter_compat.apply() and interpreter._patch_lang_tensor is wrapped, "applied twice"

    scope = interpreter._LangPatchScope()
    wrapped(_Tensor, scope)
    assert calls == [_Tensor]
    value = _Tensor()
    value.handle = _Handle(np.array([11], dtype=np.int32))
    assert range(value)[-1] == 10
    scope.restore()
    assert not hasattr(_Tensor, "__index__")


def test_apply_leaves_triton_alone_when_not_needed_or_not_recognised(monkeypatch):
    def original(tensor, scope):
        pass

    def other_form(tensor, scope, extra):
        pass

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", original)
    monkeypatch.setattr(interpreter_compat, "_numpy_refuses_array_to_scalar", lambda: False)
    assert not interpreter_compat.apply() and interpreter._patch_lang_tensor is original

    monkeypatch.setattr(interpreter_compat, "_numpy_refuses_array_to_scalar", lambda: True)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", other_form)
    assert not interpreter_compat.apply() and interpreter._patch_lang_tensor is other_form

    monkeypatch.delattr(interpreter, "_patch_lang_tensor")
    assert not interpreter_compat.apply()


def test_the_numpy_probe_survives_warnings_as_errors(monkeypatch):
    """NumPy 1.25-2.3 convert a one-element array with a DeprecationWarning: under -W error that must still
    read as "NumPy allows it", not escape from the import of the kernels."""
    import types
    import warnings

    class _Deprecated:
        def __int__(self):
            warnings.warn("Conversion of an array with ndim > 0 to a scalar is deprecated", DeprecationWarning)
            return 1

    monkeypatch.setattr(interpreter_compat, "np", types.SimpleNamespace(array=lambda _: _Deprecated()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert interpreter_compat._numpy_refuses_array_to_scalar() is False
