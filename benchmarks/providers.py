"""The layer-level providers that ``benchmarks.throughput`` times side by side.

A *case* is one linear layer (out x in = N x K), T tokens, rank r, a dtype, a device and a mode:

* ``fwd``     -- inference forward under ``torch.no_grad()``;
* ``fwd+bwd`` -- a training step of the layer: forward, then ``torch.autograd.grad`` of the output (with a random
  upstream gradient dY) with respect to the input x (the layer sits inside a network, so dx is always needed)
  and every trainable parameter. ``autograd.grad`` returns fresh gradients instead of accumulating into
  ``.grad``, so no step pays for an extra add or a zeroing.

Providers (``PROVIDERS``):

================== ==============================================================================================
full_ft            ``nn.Linear`` with a trainable weight and bias (full fine-tuning)
frozen_linear      ``nn.Linear`` with everything frozen: the floor any adapter is compared with
peft_lora          PEFT's LoRA at equal r, built by ``peft.get_peft_model`` (lora_alpha = r so the scale is 1,
                   no dropout, adapter weights in the layer's dtype: ``autocast_adapter_dtype=False``)
qrlora_torch       ``QRLoraLinear`` on the pure-torch path, strategy picked by the dispatcher
qrlora_torch_*     the same with the strategy forced ("lowrank" / "merged")
qrlora_triton      ``QRLoraLinear`` on the fused Triton path, strategy picked by the dispatcher
qrlora_triton_*    the same with the strategy forced
qrlora_*_q         ``QRLoraLinear(store_r=False)``: Q only (R = Q^T W0), half the basis memory; dispatcher's strategy
qrlora_*_multi1000 ``QRLoraLinear`` holding 1,000 adapters (lam of shape (1000, r), sharing Q and R), every batch
                   mixing them: x (T, K) is viewed as sequences of L tokens and each sequence gets a random
                   adapter id (per-sequence ``adapter_ids``, int64 on x's device, fixed for the run). L is the
                   largest divisor of T that leaves at least 1,000 sequences (1 when T < 1,000), and the ids are
                   a shuffled 0..999 cycle, so every adapter is used whenever there are 1,000 sequences or more.
                   Multi-adapter batches always run the lowrank strategy. Compare with ``qrlora_<backend>``
                   (``ratio_vs_single`` in the results: the issue's bar is 1.1x)
================== ==============================================================================================

Every weight is random and non-zero, including LoRA's B (PEFT starts it at 0) and QR-LoRA's lam (starts at 0):
zeros run measurably faster on some GPUs, and a benchmark must time the general case. Q and R are random
(Gaussian, scaled) rather than a real factorisation: the kernels' speed does not depend on their values, and the factorisation
is timed on its own (the QR initialisation section).

Flops (``flops``) are the nominal work of each provider's algorithm, the accounting of
``qrlora_kernels/dispatch.py``; TFLOP/s is that divided by the median time. Bias adds and the elementwise lam
scaling are not counted. The pure-torch QR-LoRA path is a reference implementation and may do more work than
its nominal count (it computes what carries lam in float32), so its TFLOP/s is "useful" throughput.

* frozen linear:  fwd ``2TNK``;                 bwd ``2TNK`` (dx)
* full FT:        fwd ``2TNK``;                 bwd ``4TNK`` (dx, dW)
* PEFT LoRA:      fwd ``2TNK + 2Tr(K+N)``;      bwd ``2TNK + 4Tr(K+N)`` (dx; dB, dA; the two projections of dY)
* QR-LoRA lowrank: fwd ``2TNK + 2Tr(K+N)``;     bwd ``2TNK + 2Tr(K+N)`` (dx; G = dY Q and (G lam) R)
* QR-LoRA merged: fwd ``2TNK + 2NKr``;          bwd ``2TNK`` + the cheaper dlam route of ``dispatch.dlam_costs``
* QR-LoRA Q only (store_r=False): lowrank works in the output space, fwd ``2TNK + 4TNr`` and bwd ``2TNK + 4TNr``
  (S = Y0 Q and the update; G = dY Q and dY0); merged adds ``2NKr`` (R = Q^T W0) to the forward and to the backward
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional

import torch
from torch import nn

MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# L2 of the largest current GPUs is 50-60 MB; rotating through inputs that together are several times that keeps
# every step reading x and dY from HBM, as it would inside a real network.
_ROTATION_BYTES = 256 * 2**20
_MAX_BUFFERS = 8
MULTI_ADAPTERS = 1000


@dataclasses.dataclass(frozen=True)
class Case:
    out_features: int
    in_features: int
    tokens: int
    rank: int
    dtype: torch.dtype
    mode: str
    device: str = "cpu"

    def __post_init__(self):
        for name in ("out_features", "in_features", "tokens", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.rank > min(self.out_features, self.in_features):
            raise ValueError(f"rank {self.rank} exceeds min(out, in) = {min(self.out_features, self.in_features)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype}")

    @property
    def shape(self) -> str:
        return f"{self.out_features}x{self.in_features}"

    @property
    def training(self) -> bool:
        return self.mode == "fwd+bwd"


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    description: str
    backend: Optional[str] = None       # QR-LoRA backend, None for the others
    strategy: Optional[str] = None      # forced strategy; None = the dispatcher's pick (QR-LoRA only)
    uses_rank: bool = True
    num_adapters: int = 1               # > 1: that many adapters mixed in every batch (QR-LoRA only)
    store_r: bool = True                # False: QRLoraLinear(store_r=False), Q only (QR-LoRA only)

    @property
    def is_qrlora(self) -> bool:
        return self.backend is not None


PROVIDERS = {p.name: p for p in (
    Provider("full_ft", "nn.Linear, trainable weight and bias (full fine-tuning)", uses_rank=False),
    Provider("frozen_linear", "nn.Linear, frozen (the floor)", uses_rank=False),
    Provider("peft_lora", "PEFT LoRA at equal r (peft.get_peft_model)"),
    Provider("qrlora_torch", "QR-LoRA, pure-torch path, dispatcher's strategy", backend="torch"),
    Provider("qrlora_torch_lowrank", "QR-LoRA, pure-torch path, lowrank", backend="torch", strategy="lowrank"),
    Provider("qrlora_torch_merged", "QR-LoRA, pure-torch path, merged", backend="torch", strategy="merged"),
    Provider("qrlora_triton", "QR-LoRA, fused Triton path, dispatcher's strategy", backend="triton"),
    Provider("qrlora_triton_lowrank", "QR-LoRA, fused Triton path, lowrank", backend="triton", strategy="lowrank"),
    Provider("qrlora_triton_merged", "QR-LoRA, fused Triton path, merged", backend="triton", strategy="merged"),
    Provider("qrlora_torch_q", "QR-LoRA, pure-torch path, store_r=False (Q only)", backend="torch", store_r=False),
    Provider("qrlora_triton_q", "QR-LoRA, fused Triton path, store_r=False (Q only)", backend="triton",
             store_r=False),
    Provider(f"qrlora_torch_multi{MULTI_ADAPTERS}", f"QR-LoRA, pure-torch path, {MULTI_ADAPTERS:,} adapters mixed "
             "per sequence in every batch", backend="torch", num_adapters=MULTI_ADAPTERS),
    Provider(f"qrlora_triton_multi{MULTI_ADAPTERS}", f"QR-LoRA, fused Triton path, {MULTI_ADAPTERS:,} adapters mixed "
             "per sequence in every batch", backend="triton", num_adapters=MULTI_ADAPTERS),
)}


def sequence_length(tokens: int, num_adapters: int) -> int:
    """Tokens per sequence for a multi-adapter batch of ``tokens``: the largest divisor of ``tokens`` that
    leaves at least ``num_adapters`` sequences (1 if there are fewer tokens than adapters)."""
    longest = max(1, tokens // num_adapters)
    return max(d for d in range(1, longest + 1) if tokens % d == 0)


class MultiAdapterBatch(nn.Module):
    """A multi-adapter ``QRLoraLinear`` fed (T, K) inputs as (T / L, L, K) sequences with per-sequence ids."""

    def __init__(self, layer: nn.Module, tokens: int, *, seed: int = 0):
        super().__init__()
        self.layer = layer
        self.seq_len = sequence_length(tokens, layer.num_adapters)
        sequences = tokens // self.seq_len
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randperm(sequences, generator=gen) % layer.num_adapters
        self.register_buffer("adapter_ids", ids.to(device=layer.weight.device, dtype=torch.int64))

    def token_ids(self) -> torch.Tensor:
        """The adapter of every token, (T,)."""
        return self.adapter_ids.repeat_interleave(self.seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x.view(-1, self.seq_len, x.shape[-1]), adapter_ids=self.adapter_ids)
        return y.reshape(x.shape[0], -1)


def unavailable_reason(provider: Provider, device: str) -> Optional[str]:
    """Why ``provider`` cannot be timed on ``device`` (None when it can)."""
    if provider.backend == "triton":
        if torch.device(device).type != "cuda":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return ("the Triton path runs on CPU only under Triton's interpreter (TRITON_INTERPRET=1), "
                        "which is far too slow to time meaningfully: not timed on CPU")
        try:
            import qrlora_kernels.kernels as kernels
        except ImportError as exc:
            return f"the Triton kernels are not importable ({exc})"
        missing = [name for name in ("project", "lowrank_matmul") if not hasattr(kernels, name)]
        if missing:
            return f"qrlora_kernels.kernels lacks {', '.join(missing)} (the Triton kernels have not landed)"
    if provider.name == "peft_lora":
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            return f"peft is not installed ({exc})"
    return None


def chosen_strategy(provider: Provider, case: Case) -> Optional[str]:
    """The strategy a QR-LoRA provider runs for ``case`` (forced, or what the dispatcher picks)."""
    if not provider.is_qrlora:
        return None
    if provider.num_adapters > 1:
        return "lowrank"  # what qrlora_linear runs for every multi-adapter batch
    from qrlora_kernels import dispatch
    return dispatch.choose_strategy(case.tokens, case.out_features, case.in_features, case.rank,
                                    training=case.training, elem_bytes=torch.finfo(case.dtype).bits // 8,
                                    r_stored=provider.store_r, strategy=provider.strategy)


def flops(provider: Provider, case: Case, strategy: Optional[str] = None) -> float:
    """Nominal flops of one step (see the module docstring for the definitions)."""
    T, N, K, r = case.tokens, case.out_features, case.in_features, case.rank
    base = 2.0 * T * N * K
    name = provider.name
    if name == "frozen_linear":
        return base * (2 if case.training else 1)
    if name == "full_ft":
        return base * (3 if case.training else 1)
    if name == "peft_lora":
        adapter = 2.0 * T * r * (K + N)
        return base + adapter + ((base + 2 * adapter) if case.training else 0.0)
    if not provider.is_qrlora:
        raise ValueError(f"no flop count for provider {name!r}")
    strategy = strategy or chosen_strategy(provider, case)
    if strategy == "lowrank":
        adapter = 2.0 * T * r * (K + N) if provider.store_r else 4.0 * T * N * r
        return base + adapter + ((base + adapter) if case.training else 0.0)
    merge = 2.0 * N * K * r
    implied_r = 0.0 if provider.store_r else 2.0 * N * K * r
    total = base + merge + implied_r
    if case.training:
        total += implied_r
        from qrlora_kernels import dispatch
        route = dispatch.choose_dlam_route(T, N, K, r, elem_bytes=torch.finfo(case.dtype).bits // 8)
        dlam = 2.0 * T * r * (K + N) if route == "project" else 2.0 * T * N * K + 2.0 * N * K * r
        total += base + dlam
    return total


class _PeftHost(nn.Module):
    """PEFT wraps whole models; this one-layer model gives it a named target."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_model(model: nn.Module, config):
    """``peft.get_peft_model`` with the adapter kept in the model's dtype (peft >= 0.12 would otherwise upcast
    half-precision adapters to float32; older versions never do)."""
    import inspect

    import peft
    if "autocast_adapter_dtype" in inspect.signature(peft.get_peft_model).parameters:
        return peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    return peft.get_peft_model(model, config)


def _random_(t: torch.Tensor, scale: float) -> torch.Tensor:
    with torch.no_grad():
        return t.normal_(0.0, scale)


def build_module(provider: Provider, case: Case, *, seed: int = 0) -> nn.Module:
    """The module ``provider`` times for ``case``: random, non-zero weights; only the provider's own
    trainable parameters require grad."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        N, K, r = case.out_features, case.in_features, case.rank
        linear = nn.Linear(K, N, bias=True, device=case.device, dtype=case.dtype)
        _random_(linear.weight, 1.0 / math.sqrt(K))
        _random_(linear.bias, 0.1)
        if provider.name == "full_ft":
            return linear
        linear.requires_grad_(False)
        if provider.name == "frozen_linear":
            return linear
        if provider.name == "peft_lora":
            import peft
            config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["proj"], bias="none")
            model = peft_model(_PeftHost(linear), config)
            layer = model.base_model.model.proj
            _random_(layer.lora_A["default"].weight, 1.0 / math.sqrt(K))
            _random_(layer.lora_B["default"].weight, 1.0 / math.sqrt(r))
            return layer
        if provider.is_qrlora:
            from qrlora_kernels import QRLoraLinear
            # Scaled like an orthonormal basis; orthogonality itself does not change the kernels' speed, and a
            # QR of a 28672 x 4506 matrix per case would cost more than timing the case.
            Q = (torch.randn(N, r, device=case.device, dtype=torch.float32) / math.sqrt(N)).to(case.dtype)
            R = (torch.randn(r, K, device=case.device, dtype=torch.float32) / math.sqrt(K)).to(case.dtype)
            perm = torch.randperm(K, device=case.device)
            layer = QRLoraLinear.from_basis(linear, (Q, R, perm), backend=provider.backend,
                                            strategy=provider.strategy, num_adapters=provider.num_adapters,
                                            store_r=provider.store_r)
            _random_(layer.lam, 0.5)
            return MultiAdapterBatch(layer, case.tokens) if provider.num_adapters > 1 else layer
        raise ValueError(f"unknown provider {provider.name!r}; known: {sorted(PROVIDERS)}")
    finally:
        torch.random.set_rng_state(gen_state)


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def buffer_count(case: Case, max_buffers: int = _MAX_BUFFERS) -> int:
    """How many x / dY buffers to rotate through: enough to exceed the L2 on CUDA, 2 on the CPU."""
    if torch.device(case.device).type != "cuda":
        return 2
    elem = torch.finfo(case.dtype).bits // 8
    per_step = case.tokens * (case.in_features + (case.out_features if case.training else 0)) * elem
    return max(2, min(max_buffers, math.ceil(_ROTATION_BYTES / max(per_step, 1))))


def make_inputs(case: Case, count: int, *, seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` random x buffers (T x K) and, for fwd+bwd, as many dY buffers (T x N); never zeros."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    xs = [torch.randn(case.tokens, case.in_features, generator=gen, device=case.device, dtype=case.dtype)
          .requires_grad_(case.training) for _ in range(count)]
    dys = [torch.randn(case.tokens, case.out_features, generator=gen, device=case.device, dtype=case.dtype)
           for _ in range(count)] if case.training else []
    return xs, dys


def make_step(module: nn.Module, case: Case, xs: list[torch.Tensor], dys: list[torch.Tensor]) -> Callable[[], object]:
    """One timed step; each call takes the next x (and dY) buffer in turn."""
    if not xs:
        raise ValueError("make_step needs at least one input buffer")
    counter = [0]
    params = _trainable(module)
    if not case.training:
        def forward_step():
            i = counter[0] = (counter[0] + 1) % len(xs)
            with torch.no_grad():
                return module(xs[i])
        return forward_step
    if len(dys) != len(xs):
        raise ValueError(f"fwd+bwd needs one dY buffer per x buffer, got {len(dys)} and {len(xs)}")

    def train_step():
        i = counter[0] = (counter[0] + 1) % len(xs)
        x = xs[i]
        y = module(x)
        return torch.autograd.grad(y, [x, *params], dys[i])
    return train_step


def reference_output(module_provider: Provider, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the provider's layer must compute, in float64, from its own weights (used by the tests)."""
    x64 = x.to(torch.float64)  # not detached: the tests differentiate the reference too
    if module_provider.name in ("full_ft", "frozen_linear"):
        return x64 @ module.weight.double().t() + module.bias.double()
    if module_provider.name == "peft_lora":
        base = module.base_layer
        A = module.lora_A["default"].weight.double()
        B = module.lora_B["default"].weight.double()
        scale = module.scaling["default"]
        return x64 @ base.weight.double().t() + base.bias.double() + scale * (x64 @ A.t()) @ B.t()
    if module_provider.is_qrlora:
        from qrlora_kernels.kernels import reference
        lam_index = module.token_ids() if isinstance(module, MultiAdapterBatch) else None
        layer = module.layer if isinstance(module, MultiAdapterBatch) else module
        return reference.qrlora_linear(x64, layer.weight.double(), layer.bias.double(), layer.Q.double(),
                                       layer.basis_r(torch.float64), layer.lam.detach().double(),
                                       lam_index=lam_index)
    raise ValueError(f"unknown provider {module_provider.name!r}")
