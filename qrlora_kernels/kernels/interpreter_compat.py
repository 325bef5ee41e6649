"""Triton's CPU interpreter across Triton releases: what our kernels need from it that older releases lack.

Three gaps, each closed only where it shows (compiled kernels never go through the interpreter):

1. NumPy 2.4 and newer (Triton releases before triton-lang/triton#9171's fix: 3.2 to 3.6, 3.6 being the GPU
   image's). The interpreter passes every scalar kernel argument as a one-element NumPy array and gives
   ``tl.tensor`` an ``__index__`` of ``int(data)``; NumPy 2.4 made that conversion an error, so any ``range`` over
   a kernel argument (every K-loop here) fails with "only 0-dimensional arrays can be converted to Python
   scalars". ``apply()`` makes the interpreter's patch of ``tl.tensor`` install a squeezing ``__index__`` (what
   Triton 3.8 does), when NumPy refuses the conversion and the private hook has one of its two known forms:
   ``(tensor, scope)`` (3.6 and newer), whose scope restores it with everything else after each launch, or
   ``(tensor)`` (3.2 to 3.5), which sets the attributes once and for good, as Triton's own did there.
2. Triton 3.2 (torch 2.6's) passes every ``triton.Config`` field to the kernel, its warp-specialisation ones
   (``num_buffers_warp_spec``, ...) included, and its interpreter drops only the fields it lists, so every
   autotuned kernel failed with "got an unexpected keyword argument 'num_buffers_warp_spec'". ``apply()`` adds
   the missing Config fields to that list.
3. Triton 3.2's ``Autotuner`` asks the GPU driver for a benchmarker when a kernel is decorated, which raises
   "0 active drivers" on a machine without a GPU, so the kernels could not even be imported there.
   ``autotune()`` (``triton.autotune`` for our kernels) then decorates again with a stand-in driver whose
   benchmarker returns equal times without running anything: under the interpreter a single config is launched
   and none is timed, and without it CPU tensors are refused before any launch. Where a GPU driver exists (and
   on Triton 3.6 and 3.8, which ask only when they time configs) Triton's own is used.

Each is idempotent and leaves Triton alone where the gap is not there or its internals are not in the expected
form (the kernels then fail with Triton's own error, as before).
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np
import triton

_MARK = "_qrlora_index_squeezes"


def _numpy_refuses_array_to_scalar() -> bool:
    # NumPy 1.25-2.3 allow it with a DeprecationWarning, which must not become an error at import under -W error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            int(np.array([1]))
        except TypeError:
            return True
    return False


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def apply() -> bool:
    """Close gaps 1 and 2 where they show; True if the interpreter now uses the squeezing ``__index__``."""
    from triton.runtime import interpreter

    _list_every_config_field(interpreter)

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or not _numpy_refuses_array_to_scalar():
        return False
    if getattr(patch, _MARK, False):
        return True
    form = list(inspect.signature(patch).parameters)
    if form == ["tensor", "scope"]:
        def patch_lang_tensor(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", _index)
    elif form == ["tensor"]:
        def patch_lang_tensor(tensor):
            patch(tensor)
            tensor.__index__ = _index
    else:
        return False

    setattr(patch_lang_tensor, _MARK, True)
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def _list_every_config_field(interpreter) -> None:
    reserved = getattr(interpreter, "RESERVED_KWS", None)
    if not isinstance(reserved, list):
        return
    try:
        fields = triton.Config({}).all_kwargs()
    except Exception:  # a Config without all_kwargs or defaults: nothing to add
        return
    reserved.extend(name for name in fields if name not in reserved)


def _untimed(kernel_call, quantiles=None, **kwargs):
    return [0.0] * len(quantiles) if quantiles else 0.0


class _InterpreterDriver:
    """Stands in for ``triton.runtime.driver.driver`` while an Autotuner is built under the interpreter."""

    class _Active:
        @staticmethod
        def get_benchmarker():
            return _untimed

    active = _Active()


def autotune(**kwargs):
    """``triton.autotune(**kwargs)``, whose Autotuner falls back to a benchmarker that needs no GPU where Triton
    asks for the GPU's while decorating and there is none (gap 3). Triton 3.2's ``autotune`` also drops a
    ``do_bench`` argument, so it cannot be passed in."""
    decorate = triton.autotune(**kwargs)

    def decorator(fn):
        try:
            return decorate(fn)
        except RuntimeError as err:
            if "0 active drivers" not in str(err):
                raise
        from triton.runtime import autotuner
        real = autotuner.driver
        autotuner.driver = _InterpreterDriver()
        try:
            return decorate(fn)
        finally:
            autotuner.driver = real

    return decorator
