"""qrlora-kernels: QR-LoRA (arXiv 2508.21810) with a pivoted-QR extension and fused Triton kernels.

Layout (each module has one job):

* ``qr``          -- ``qrcp``: the blocked, column-pivoted Householder QR in ``csrc/``.
* ``kernels/``    -- Triton kernels, and ``kernels/reference.py``, the pure-torch math they are checked against.
* ``ops``         -- the thin ``torch.library`` op / autograd layer over the kernels.
* ``functional``  -- ``qrlora_linear``, the functional form, with the strategy dispatcher.
* ``basis``       -- building an adapter basis (Q_r, R_r, pivots) from a weight, and rank rules.
* ``layer``       -- ``QRLoraLinear``, the drop-in replacement for ``nn.Linear``.
* ``config``, ``model``, ``adapter_io``, ``hub``, ``trainer_callback`` -- the model-level, PEFT-style API.

Names are imported lazily so that ``import qrlora_kernels`` stays cheap (no triton import).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "build_info": "._extension",
    "qrcp": ".qr",
    "QRCPResult": ".qr",
    "QRCPRawResult": ".qr",
    "qrcp_batched": ".qr",
    "qrlora_linear": ".functional",
    "QRLoraLinear": ".layer",
    "QRLoraConfig": ".config",
    "apply_qrlora": ".model",
    "merge_and_unload": ".model",
    "unload": ".model",
    "delete_adapter": ".model",
    "adapter_batch": ".model",
    "disable_adapters": ".model",
    "set_adapter": ".model",
    "save_adapter": ".adapter_io",
    "load_adapter": ".adapter_io",
    "push_adapter_to_hub": ".hub",
    "QRLoraCheckpointCallback": ".trainer_callback",
}

# ``from qrlora_kernels import *`` must not need the optional transformers.
__all__ = sorted(set(_EXPORTS) - {"QRLoraCheckpointCallback"})


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qrlora_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
