"""Choosing the low-rank or the merged strategy for one QR-LoRA linear call.

With T tokens, N = out_features, K = in_features, rank r and e bytes per element:

* **lowrank** (path a) -- ``S = x R^T``, then one fused GEMM ``y = x W0^T + (S*lam) Q^T + b``.
  Extra work over the frozen GEMM, forward: ``2*T*r*K`` (project, a pass over x) + ``2*T*r*N`` (inside the
  fused GEMM). Backward adds the same again: ``G = dY Q`` (``2*T*N*r``, a pass over dY, with dlam reduced in
  the same pass) and ``(G*lam) R`` fused into the dx GEMM (``2*T*r*K``). Relative cost ~ ``r/N + r/K``,
  independent of T.
* **merged** (path b) -- ``W_eff = W0 + (Q*lam) R`` then a plain GEMM. Extra forward: ``2*N*K*r`` flops plus a
  pass over W (read W0, write W_eff: ``2*N*K*e`` bytes), independent of T, so relative cost ~ ``r/T``.
  Backward: ``dx = dY W_eff`` costs nothing extra; dlam costs the cheaper of
  ``2*T*r*(K+N)`` (recompute S, then G and the reduction) and ``2*T*N*K + 2*N*K*r``
  (``diag(Q^T (dY^T x) R^T)``: a weight-gradient GEMM, cheaper only when r is large, r > N*K/(N+K) roughly).

Without a stored R (``QRLoraLinear(store_r=False)``: R = Q^T W0, see ``functional``):

* **lowrank** works in the output space: the frozen GEMM writes Y0, ``S = Y0 Q`` (``2*T*N*r``, a pass over
  the output), and ``y = Y0 + (S*lam) Q^T + b`` (``2*T*r*N``, one kernel, ``kernels.lowrank_update``, reading
  Y0 and writing y: another pass over the T x N output).
  Backward: ``G = dY Q`` with dlam as before, then ``dY0 = dY + (G*lam) Q^T`` (``lowrank_update`` again)
  before the frozen dx GEMM. The same flops as with R for a square layer, plus passes over the output: still
  independent of T.
* **merged** forms ``R~ = Q^T W0`` (``2*N*K*r``) in the forward and again in the backward, doubling its
  r/T term.

Each step is costed with a roofline, ``max(flops / peak_flops, bytes / bandwidth) + launch``, on a
``DeviceModel`` (default: H100-class bf16 numbers; the ratio, not the absolute values, decides). The model
prefers lowrank for inference when ``2*T*r*(K+N) < 2*N*K*r + pass over W``, i.e. roughly below
``T ~ N*K/(N+K)`` tokens, and merged above. Multi-adapter batches (per-token lam rows) always take the
lowrank path: there is no single merged weight.

Memory (not in the model): for the backward, lowrank saves only S (T x r, float32); merged saves x and W_eff
(N x K), which is what the frozen GEMM alone would not keep. The merged path is picked when T is large, where
W_eff is no bigger than the activations already held; force "lowrank" when memory is tight.

Override (for tests and experiments): the ``strategy=`` argument, else the environment variable
``QRLORA_STRATEGY`` ("lowrank", "merged" or "auto"), else the cost model.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

STRATEGIES = ("lowrank", "merged")
DLAM_ROUTES = ("project", "weight_grad")
STRATEGY_ENV_VAR = "QRLORA_STRATEGY"


@dataclass(frozen=True)
class DeviceModel:
    """Throughputs the roofline uses. Only their ratio and the launch cost matter for the choice."""
    flops_per_s: float = 800e12      # dense bf16 tensor-core GEMM, achieved (H100 SXM peak ~989e12)
    bytes_per_s: float = 3.0e12      # HBM3, achieved
    launch_s: float = 4e-6           # one extra kernel launch


DEFAULT_DEVICE_MODEL = DeviceModel()
_ACC_BYTES = 4  # S and G are kept in float32


def _step(flops: float, bytes_moved: float, model: DeviceModel) -> float:
    return max(flops / model.flops_per_s, bytes_moved / model.bytes_per_s) + model.launch_s


def _project_cost(T, rows, r, e, model):
    """A = input (T x rows) times a (rows x r) basis, writing a float32 (T x r) result."""
    return _step(2 * T * rows * r, e * (T * rows + rows * r) + _ACC_BYTES * T * r, model)


def dlam_costs(T: int, N: int, K: int, r: int, *, elem_bytes: int = 2,
               model: DeviceModel = DEFAULT_DEVICE_MODEL) -> dict:
    """Seconds (modelled) for dlam in the merged path's backward, per route."""
    e = elem_bytes
    via_projection = _project_cost(T, K, r, e, model) + _project_cost(T, N, r, e, model)
    via_weight_grad = (_step(2 * T * N * K, e * (T * N + T * K) + _ACC_BYTES * N * K, model)
                       + _step(2 * N * K * r, _ACC_BYTES * N * K + e * (N * r + r * K), model))
    return {"project": via_projection, "weight_grad": via_weight_grad}


def _implied_r_cost(N, K, r, e, model):
    """R~ = Q^T W0 (r x K), formed by a store_r=False layer's merged path."""
    return _step(2 * N * K * r, e * (N * K + N * r + r * K), model)


def _output_space_cost(T, N, r, e, model):
    """``kernels.lowrank_update``: a (T x N) matrix read, plus (P * lam) Q^T (and the bias), written: the
    store_r=False lowrank update, forward (of Y0) and backward (of dY)."""
    return _step(2 * T * r * N, e * (2 * T * N + N * r) + _ACC_BYTES * T * r, model)


def strategy_costs(T: int, N: int, K: int, r: int, *, training: bool, elem_bytes: int = 2, r_stored: bool = True,
                   model: DeviceModel = DEFAULT_DEVICE_MODEL) -> dict:
    """Modelled extra seconds over the frozen GEMM (forward, plus backward when ``training``) per strategy.

    ``r_stored=False``: the layer keeps Q only (``store_r=False``), costed as described in the module docstring.
    """
    e = elem_bytes
    merged = _step(2 * N * K * r, e * (2 * N * K + N * r + r * K), model)
    if r_stored:
        lowrank_forward = _project_cost(T, K, r, e, model) + 2 * T * r * N / model.flops_per_s
        lowrank_backward = _project_cost(T, N, r, e, model) + 2 * T * r * K / model.flops_per_s
        implied_r = 0.0
    else:  # the same two output-space steps each way: S = Y0 Q, y = Y0 + ...; then G = dY Q, dY0 = dY + ...
        lowrank_forward = lowrank_backward = (_project_cost(T, N, r, e, model)
                                              + _output_space_cost(T, N, r, e, model))
        implied_r = _implied_r_cost(N, K, r, e, model)  # formed in the forward, and again in the backward
    lowrank = lowrank_forward
    merged += implied_r
    if training:
        lowrank += lowrank_backward
        merged += implied_r
        # A list: torch 2.6's dynamo cannot take min() of a dict's values (fullgraph compile broke there).
        merged += min(list(dlam_costs(T, N, K, r, elem_bytes=e, model=model).values()))
    return {"lowrank": lowrank, "merged": merged}


def _requested_strategy(strategy: str | None) -> str | None:
    requested = strategy if strategy is not None else os.environ.get(STRATEGY_ENV_VAR)
    if requested is None or requested == "auto":
        return None
    if requested not in STRATEGIES:
        source = "strategy" if strategy is not None else f"${STRATEGY_ENV_VAR}"
        raise ValueError(f"{source} must be one of {STRATEGIES + ('auto',)}, got {requested!r}")
    return requested


def choose_strategy(T: int, N: int, K: int, r: int, *, training: bool, per_token_lam: bool = False,
                    elem_bytes: int = 2, r_stored: bool = True, strategy: str | None = None,
                    model: DeviceModel = DEFAULT_DEVICE_MODEL) -> str:
    """"lowrank" or "merged" for this shape; ``strategy`` (or ``$QRLORA_STRATEGY``) overrides the model.

    ``per_token_lam`` (a multi-adapter batch) forces "lowrank"; asking for "merged" explicitly then is an error,
    while the environment variable only applies where it is legal.
    """
    requested = _requested_strategy(strategy)
    if per_token_lam:
        if strategy == "merged":
            raise ValueError("strategy='merged' is impossible for a multi-adapter batch (per-token lam rows "
                             "have no single merged weight); use 'lowrank' or None")
        return "lowrank"
    if requested is not None:
        return requested
    return _cached(_cheaper_strategy, T, N, K, r, training, elem_bytes, r_stored, model)


def choose_dlam_route(T: int, N: int, K: int, r: int, *, elem_bytes: int = 2,
                      model: DeviceModel = DEFAULT_DEVICE_MODEL) -> str:
    """"project" (S and G) or "weight_grad" (diag(Q^T (dY^T x) R^T)) for the merged path's dlam."""
    return _cached(_cheaper_dlam_route, T, N, K, r, elem_bytes, model)


def _cheaper_strategy(T, N, K, r, training, elem_bytes, r_stored, model) -> str:
    costs = strategy_costs(T, N, K, r, training=training, elem_bytes=elem_bytes, r_stored=r_stored, model=model)
    return "merged" if costs["merged"] < costs["lowrank"] else "lowrank"


def _cheaper_dlam_route(T, N, K, r, elem_bytes, model) -> str:
    costs = dlam_costs(T, N, K, r, elem_bytes=elem_bytes, model=model)
    return "weight_grad" if costs["weight_grad"] < costs["project"] else "project"


@functools.lru_cache(maxsize=4096)
def _remembered(choice, *args):
    return choice(*args)


def _cached(choice, *args):
    """Every eager forward asks, so concrete shapes are answered from a cache (a model has few distinct
    shapes). While torch.compile traces, the choice is evaluated directly: a traced lookup in the cache
    would guard on its contents and recompile whenever it grows (and sizes may be symbolic)."""
    if torch.compiler.is_compiling() or not all(type(v) is int for v in args[:4]):
        return choice(*args)
    return _remembered(choice, *args)
