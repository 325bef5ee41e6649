"""Fused Triton kernels of QR-LoRA (host functions) and, in ``reference``, their pure-torch twins.

Each host function has its ``reference`` twin's signature and semantics, plus ``out=`` (a preallocated output)
and ``input_precision=`` ("ieee" or "tf32" for float32 dots). CPU tensors run under Triton's interpreter,
which needs ``TRITON_INTERPRET=1`` set before this package is imported.
"""
from .lowrank_matmul import lowrank_matmul, lowrank_update
from .merged_weight import dlam_via_weight_grad, merged_weight
from .projection import project, project_and_reduce

__all__ = ["project", "project_and_reduce", "lowrank_matmul", "lowrank_update", "merged_weight",
           "dlam_via_weight_grad"]
