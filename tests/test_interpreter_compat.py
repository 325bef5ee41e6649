"""interpreter_compat: Triton interpreters older than the fix (3.2 to 3.6; 3.6 is the GPU image's) on NumPy >= 2.4.

The first test is the one that fails there without the fix (every K-loop is a ``range`` over a kernel
argument); on Triton 3.8 it passes either way. The others check the wrapper itself on stand-ins.
"""
import inspect

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
    ours = getattr(interpreter._patch_lang_tensor, interpreter_compat._MARK, False)  # else Triton's own
    if ours and hasattr(interpreter, "_LangPatchScope"):  # a per-launch patch (Triton 3.6+) is given back
        assert getattr(tl.core.tensor, "__index__", None) is index_before, "the launch's patch leaked"


class _Handle:
    def __init__(self, data):
        self.data = data


class _Tensor:
    pass


def test_the_wrapper_adds_a_squeezing_index_for_the_launch_only(monkeypatch):
    import numpy as np

    if not hasattr(interpreter, "_LangPatchScope"):
        pytest.skip(f"Triton {triton.__version__}'s interpreter patches without a scope (that wrapper is tested "
                    f"next)")

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


def test_the_wrapper_of_a_scopeless_patch_sets_a_squeezing_index(monkeypatch):
    """Triton 3.2 to 3.5 patch ``tl.tensor`` with ``_patch_lang_tensor(tensor)``, once and for good: the
    wrapper calls it, then replaces its ``__index__`` the same way."""
    import numpy as np

    calls = []

    def original(tensor):
        calls.append(tensor)
        tensor.__index__ = lambda self: int(self.handle.data)
        tensor.__bool__ = lambda self: True

    class _Scopeless:
        pass

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", original)
    monkeypatch.setattr(interpreter_compat, "_numpy_refuses_array_to_scalar", lambda: True)
    assert interpreter_compat.apply()
    wrapped = interpreter._patch_lang_tensor
    assert wrapped is not original and list(inspect.signature(wrapped).parameters) == ["tensor"]
    assert interpreter_compat.apply() and interpreter._patch_lang_tensor is wrapped, "applied twice"

    wrapped(_Scopeless)
    assert calls == [_Scopeless] and _Scopeless.__bool__(None) is True, "Triton's own patch did not run"
    value = _Scopeless()
    value.handle = _Handle(np.array([11], dtype=np.int32))
    assert range(value)[-1] == 10
    value.handle = _Handle(np.array([[3]], dtype=np.int64))
    assert value.__index__() == 3


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


def test_every_config_field_is_dropped_before_the_kernel_call():
    """Triton 3.2's interpreter dropped only the Config fields it listed, so num_buffers_warp_spec and its kin
    reached every autotuned kernel as unexpected keyword arguments."""
    import types
    stand_in = types.SimpleNamespace(RESERVED_KWS=["num_warps", "grid"])
    interpreter_compat._list_every_config_field(stand_in)
    fields = list(triton.Config({}).all_kwargs())
    assert set(fields) <= set(stand_in.RESERVED_KWS) and stand_in.RESERVED_KWS[:2] == ["num_warps", "grid"]
    listed = list(stand_in.RESERVED_KWS)
    interpreter_compat._list_every_config_field(stand_in)
    assert stand_in.RESERVED_KWS == listed, "applied twice"
    untouched = types.SimpleNamespace(RESERVED_KWS=("num_warps",))
    interpreter_compat._list_every_config_field(untouched)
    assert untouched.RESERVED_KWS == ("num_warps",)


def test_autotune_needs_no_gpu_driver_under_the_interpreter(monkeypatch):
    """Triton 3.2's Autotuner asked the GPU driver for a benchmarker when a kernel was decorated ("0 active
    drivers" without a GPU): it then finds one that runs and times nothing, and the driver is given back after
    the decoration; with a GPU driver, Triton's own; other errors pass through."""
    from triton.runtime import autotuner

    class _NoGpu:
        @property
        def active(self):
            raise RuntimeError("0 active drivers ([]). There should only be one.")

    no_gpu = _NoGpu()
    monkeypatch.setattr(autotuner, "driver", no_gpu)

    def like_triton_3_2(**kwargs):  # what its Autotuner.__init__ does when decorating
        return lambda fn: (fn, autotuner.driver.active.get_benchmarker())

    monkeypatch.setattr(triton, "autotune", like_triton_3_2)
    fn, bench = interpreter_compat.autotune(configs=[], key=[])(len)
    assert fn is len and bench is interpreter_compat._untimed and autotuner.driver is no_gpu

    class _Gpu:
        class active:
            @staticmethod
            def get_benchmarker():
                return "the GPU's"

    monkeypatch.setattr(autotuner, "driver", _Gpu())
    assert interpreter_compat.autotune(configs=[], key=[])(len)[1] == "the GPU's"

    for message in ("something else", "2 active drivers ([...]). There should only be one."):
        def other_error(**kwargs):
            def decorate(fn):
                raise RuntimeError(message)
            return decorate

        monkeypatch.setattr(triton, "autotune", other_error)
        with pytest.raises(RuntimeError, match=message[:10]):
            interpreter_compat.autotune(configs=[], key=[])(len)
    ran = []
    assert interpreter_compat._untimed(lambda: ran.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert interpreter_compat._untimed(lambda: ran.append(1)) == 0.0 and not ran
