"""Loads the compiled extension ``qrlora_kernels._C``, which registers the ``qrlora::`` ops."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load():
    """Import the extension once; raise a clear error when it was never built."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.qrlora.*)
    except ImportError as exc:
        raise ImportError(
            "qrlora_kernels._C is not built. Build it with `pip install --no-build-isolation -e .` "
            f"(or `make install`) in the repository root. Original error: {exc}"
        ) from exc
    return _C


def build_info() -> dict:
    """Which kind of extension was built (CPU-only or CUDA) and for which architectures."""
    ext = load()
    info = dict(ext.build_info())
    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
