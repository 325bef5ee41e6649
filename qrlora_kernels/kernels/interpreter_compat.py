"""Triton's CPU interpreter on NumPy 2.4 and newer, for Triton releases that predate the fix (3.6 among them).

The interpreter passes every scalar kernel argument as a one-element NumPy array and gives ``tl.tensor`` an
``__index__`` of ``int(data)``. NumPy 2.4 made converting an array with ``ndim > 0`` to a Python scalar an error,
so any ``range`` over a kernel argument (every K-loop here) fails under the interpreter with "only 0-dimensional
arrays can be converted to Python scalars" (triton-lang/triton#9171; Triton 3.8 reads ``data.squeeze()``).
Triton 3.6 is the GPU image's release, and a fresh Python 3.12 environment installs NumPy 2.5.

``apply()`` makes the interpreter's per-launch patch of ``tl.tensor`` install the squeezing ``__index__`` (what
Triton 3.8 does) and restore it with everything else after the launch. It changes nothing unless the interpreter
is on and NumPy refuses the conversion, is idempotent, and leaves Triton alone if the private function it wraps
is not there in the expected form (the kernels then fail with Triton's own error, as before). Compiled kernels
never go through the interpreter and are not affected.
"""
from __future__ import annotations

import inspect
import warnings

import numpy as np

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
    """Install the fix when it is needed and possible; True if the interpreter now uses it."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or not _numpy_refuses_array_to_scalar():
        return False
    if getattr(patch, _MARK, False):
        return True
    if list(inspect.signature(patch).parameters) != ["tensor", "scope"]:
        return False

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    setattr(patch_lang_tensor, _MARK, True)
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
