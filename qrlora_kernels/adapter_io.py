"""Saving and loading QR-LoRA adapters: ``adapter.safetensors`` + ``adapter_config.json``.

A QR-LoRA basis is a deterministic function of the base weight and its pivots (see
``basis.py``), so by default an adapter stores, per module, only ``lam`` (r scalars) and the
pivots ``perm[:r]`` (r int32): the file is O(total r). At load the basis is rebuilt with
``basis_from_pivots`` (an unpivoted QR of ``W[:, pivots]``, signs normalised).
``include_basis=True`` also stores Q_r and R_r, for a bit-exact reload without any QR (Q_r only for a layer
built with ``store_r=False``, whose module entry then says ``"store_r": false``; such layers are rebuilt so).

Because the rebuilt basis is only right on the *same* base weights, ``adapter_config.json``
keeps a fingerprint of every adapted weight (shape, dtype, a hash of a strided sample of its
bytes, and float64 sums of it and of its squares, which see a change anywhere; for a float32
base also of its bfloat16/float16 roundings, so the adapter loads onto the same checkpoint loaded
in half precision), plus a checksum of every module's stored tensors. Problems get a
``ValueError`` naming the module.

Layout of ``adapter_config.json``::

    {"format": "qrlora-adapter", "format_version": 1, "adapter_name": ..., "config": {QRLoraConfig},
     "include_basis": false, "base_model_name_or_path": "roberta-base" or null (written, not checked),
     "modules": {name: {"rank", "in_features", "out_features", "bias", "tau", "energy",
                        "dtype", "lam_dtype", "fingerprint": {...}, "checksum": ...}},
     "modules_to_save": {name: checksum}}

Tensors in ``adapter.safetensors``: ``<module>.lam``, ``<module>.pivots`` (and ``<module>.Q``,
``<module>.R``), and ``modules_to_save.<module>.<state_dict key>``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .atomic_file import atomic_write_files
from .config import ENERGY_RULES, QRLoraConfig
from .functional import acc_dtype, implied_r
from .model import (ACTIVE_ADAPTER_ATTR, ADAPTER_FILES_ATTR, ADAPTER_IDS_ATTR, CONFIG_ATTR, DEFAULT_ADAPTER,
                    MODULES_TO_SAVE_ATTR, _layer_class, _read_by_parent, _refuse_unloaded_weight, _set_submodule,
                    active_adapter_name, adapter_row, canonical_name, default_adapter_name, lam_trains,
                    module_copies, modules_by_canonical_name,
                    parameter_holding_wrapper, qrlora_layers, refuse_bare_layer, skip_bases_in_hf_checkpoints,
                    unwrap_model)
from .modules_to_save import BASE, refuse_sharded
from .reentrant_checkpointing import keep_gradients_through_reentrant_checkpoints
from .distributed import module_progress

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Where QRLoraCheckpointCallback puts the adapter inside a Trainer checkpoint (not beside the model's files: an
# adapter_config.json there makes transformers, with peft installed, take the checkpoint for a PEFT adapter).
CHECKPOINT_ADAPTER_FOLDER = "qrlora-adapter"
FORMAT = "qrlora-adapter"
FORMAT_VERSION = 1
FINGERPRINT_SAMPLES = 4096
# float64 sums of the same values agree to ~1e-15 whatever the device or reduction order.
FINGERPRINT_SUM_RTOL = 1e-9
SAVED_PREFIX = "modules_to_save."


# ------------------------------------------------------------------------------------------ helpers
def base_model_name(model: nn.Module) -> Optional[str]:
    """The Hub id or folder a transformers model was loaded from (PEFT's ``base_model_name_or_path``); None for a
    model built from a config, or not from transformers."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # view(uint8) works for every dtype, bfloat16 included (numpy has none).
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):  # safetensors does not keep insertion order
        t = tensors[key]
        h.update(f"{key}:{_dtype_name(t.dtype)}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def weight_fingerprint(weight: torch.Tensor, dtype: Optional[torch.dtype] = None, *, cache: bool = False,
                       moment: bool = True) -> dict:
    """A cheap identity of a weight (rounded to ``dtype``, default its own): shape, dtype, a hash of a strided byte
    sample, float64 sums.

    The sample hash catches any different model; the sums catch a change anywhere in the weight (fine-tuned or
    perturbed weights), at the cost of a pass over it: the sum and the sum of squares, and a position-weighted sum
    (entry (i, j) weighted by cos(i) + sin(j + 1)), which a rearrangement of the entries (two swapped, which keeps
    the first two) changes (``moment=False`` leaves it out, a pass less). ``cache=True`` keeps the sums per
    weight tensor, dtype and version (``load_adapter`` checks the same base weight once per adapter, and a server
    loads many adapters): an in-place change bumps the version, and one that bypasses it (through ``.data``)
    is still seen by the sample hash, computed every time, where it touches a sampled position.
    """
    w = weight.detach()
    dtype = w.dtype if dtype is None else dtype
    cache = cache and _cacheable(weight)
    key = (dtype, w._version, w.data_ptr(), str(w.device), tuple(w.shape), w.dtype) if cache else None
    sums = _FINGERPRINT_SUMS.get(weight, {}).get(key) if cache else None
    if sums is None or len(sums) < 2 + moment:
        w64 = w.to(dtype).to(torch.float64).reshape(-1)
        # dot, not square().sum(): no second float64 copy (both sums agree far within FINGERPRINT_SUM_RTOL).
        parts = [w64.sum(), torch.dot(w64, w64)]
        if moment:
            grid = w64.reshape(w.shape[0] if w.dim() and w.numel() else 1, -1)
            rows = torch.arange(grid.shape[0], device=grid.device, dtype=torch.float64).cos()
            cols = torch.arange(1, grid.shape[1] + 1, device=grid.device, dtype=torch.float64).sin()
            parts.append(torch.dot(grid.sum(1), rows) + torch.dot(grid.sum(0), cols))
        sums = tuple(torch.stack(parts).tolist())  # one device sync
        if cache:
            _FINGERPRINT_SUMS.setdefault(weight, {})[key] = sums
    fingerprint = {"shape": list(w.shape), "dtype": _dtype_name(dtype), "sample_hash": sample_hash(w, dtype),
                   "sum": sums[0], "sum_sq": sums[1]}
    if moment:
        fingerprint["moment"] = sums[2]
    return fingerprint


def sample_hash(weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> str:
    """A hash of the weight's dtype, shape and a strided sample of FINGERPRINT_SAMPLES of its values (rounded to
    ``dtype``, default its own): no pass over the whole weight."""
    w = weight.detach()
    dtype = w.dtype if dtype is None else dtype
    n = w.numel()
    k = min(n, FINGERPRINT_SAMPLES)
    positions = (torch.arange(k, device=w.device, dtype=torch.int64) * n) // max(k, 1)
    if w.dim() == 2 and n:  # indexed in place: reshape(-1) would copy a transposed (Conv1D) weight whole
        sample = w[positions // w.shape[1], positions % w.shape[1]]
    else:
        sample = w.reshape(-1).index_select(0, positions)
    sample = sample.to(dtype)  # elementwise: the sample of the rounded weight
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{_dtype_name(dtype)}{tuple(w.shape)}".encode())
    h.update(_tensor_bytes(sample))
    return h.hexdigest()


# weight tensor -> {(dtype, version, data_ptr, device, shape, own dtype): (sum, sum_sq[, moment])}; entries go with
# the tensor.
_FINGERPRINT_SUMS = WeakIdKeyDictionary()


def _cacheable(weight: torch.Tensor) -> bool:
    # An inference tensor has no version counter (reading it raises inside inference_mode; outside, a detached
    # one reads 0 whatever was changed in place), so its sums are never kept.
    return not (weight.is_meta or _is_sharded(weight) or weight.is_inference())


# Half-precision copies of a wider base (the usual inference set-up: an adapter trained on a float32 base, served
# on the same checkpoint loaded in bfloat16) are fingerprinted too, so the adapter loads onto them.
ROUNDED_DTYPES = {torch.float64: (torch.float32, torch.bfloat16, torch.float16),
                  torch.float32: (torch.bfloat16, torch.float16)}


def base_fingerprint(weight: torch.Tensor) -> dict:
    """``weight_fingerprint`` plus, for a float32/float64 weight, the fingerprints of its narrower roundings."""
    fingerprint = weight_fingerprint(weight)
    narrower = ROUNDED_DTYPES.get(weight.dtype, ())
    if narrower:
        # Without the moment: the sums and the sample of a rounded copy suffice, and the config stays small.
        fingerprint["rounded"] = {_dtype_name(d): weight_fingerprint(weight.detach().to(d), moment=False)
                                  for d in narrower}
    return fingerprint


def _same_fingerprint(now: dict, saved: dict, numel: int) -> bool:
    scale_sq = max(abs(saved["sum_sq"]), 1e-300)
    # |sum| is at most sqrt(sum_sq * numel), the moment (weights in [-2, 2]) twice that.
    linear = FINGERPRINT_SUM_RTOL * math.sqrt(scale_sq * numel)
    return (now["sample_hash"] == saved["sample_hash"]
            and abs(now["sum_sq"] - saved["sum_sq"]) <= FINGERPRINT_SUM_RTOL * scale_sq
            and abs(now["sum"] - saved["sum"]) <= linear
            # Absent from rounded fingerprints and from adapters saved before it was added: checked where present.
            and ("moment" not in saved or abs(now["moment"] - saved["moment"]) <= 2 * linear))


def _fingerprint_problem(weight: torch.Tensor, saved: dict) -> Optional[str]:
    """None when ``weight`` is the saved base weight (or its rounding to ``weight``'s dtype), else why not."""
    if list(weight.shape) != list(saved["shape"]):
        return f"its weight has shape {tuple(weight.shape)}, the adapter was made for {tuple(saved['shape'])}"
    saved_dtype = _dtype_from_name(saved["dtype"])
    # A weight held in another dtype is the same weight when it rounds to the saved values exactly.
    if _same_fingerprint(weight_fingerprint(weight, saved_dtype, cache=True), saved, weight.numel()):
        return None
    if weight.dtype == saved_dtype:
        return ("its base weight differs from the one the adapter was made for (different base model or changed "
                "weights): the fingerprint does not match")
    rounded = (saved.get("rounded") or {}).get(_dtype_name(weight.dtype))
    if rounded is None:
        return (f"dtype mismatch that cannot be honoured: the adapter was made on a {saved['dtype']} base weight and "
                f"this one is {_dtype_name(weight.dtype)} and does not round to the same values; load the base model "
                f"in {saved['dtype']}")
    if _same_fingerprint(weight_fingerprint(weight, cache=True), rounded, weight.numel()):
        return None
    return (f"its base weight differs from the one the adapter was made for, also after rounding that "
            f"{saved['dtype']} weight to {_dtype_name(weight.dtype)} (different base model or changed weights)")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded ``DTensor`` (a collective: every rank must take part); else ``t``."""
    t = t.detach()
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _is_sharded(t: torch.Tensor) -> bool:
    return callable(getattr(t, "full_tensor", None))


def _lam_rows(layer: nn.Module) -> torch.Tensor:
    lam = _full(layer.lam)
    return lam if lam.dim() == 2 else lam.unsqueeze(0)


def _num_adapters(layer: nn.Module) -> int:
    return _lam_rows(layer).shape[0]


def _resize_adapters(layer: nn.Module, num_adapters: int) -> None:
    """Give ``layer`` ``num_adapters`` rows of lam; new rows are zero (no update)."""
    current = _num_adapters(layer)
    if current >= num_adapters:
        return
    if hasattr(layer, "set_num_adapters"):
        layer.set_num_adapters(num_adapters)
        return
    for _ in range(num_adapters - current):
        layer.add_adapter()


def _write_lam_row(layer: nn.Module, row: int, values: torch.Tensor) -> None:
    with torch.no_grad():
        lam = layer.lam
        padded = torch.zeros(lam.shape[-1], dtype=lam.dtype, device=lam.device)
        padded[: values.numel()] = values.to(device=lam.device, dtype=lam.dtype)
        if lam.dim() == 1:
            if row != 0:
                raise ValueError(f"layer has one adapter, cannot write adapter row {row}")
            lam.copy_(padded)
        else:
            lam[row].copy_(padded)


# ------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, path: Union[str, os.PathLike], *, include_basis: bool = False,
                 adapter_name: Optional[str] = None, is_main_process: Optional[bool] = None) -> dict[str, Path]:
    """Write ``path/adapter.safetensors`` and ``path/adapter_config.json`` (each atomically).

    ``model`` may be wrapped (``DistributedDataParallel``, ``DataParallel``, ``torch.compile``): module names
    are the unwrapped model's, so the adapter loads into a plain base model. Under FSDP2 (``fully_shard``) the
    sharded tensors are gathered, a collective: call ``save_adapter`` on every rank.
    ``adapter_name`` picks the adapter (row of lam) to save when several are loaded; by default the one the model
    computes with (``model.default_adapter_name``). ``include_basis=True`` also stores Q_r and R_r for a
    bit-exact reload.
    ``is_main_process``: whether this process writes the files (default: rank 0 of an initialised process
    group, else True), as in Hugging Face's ``save_pretrained``. Returns the two paths.
    """
    from safetensors.torch import save as safetensors_save

    model = unwrap_model(model)
    refuse_bare_layer(model, "save_adapter")
    layers = qrlora_layers(model)
    if not layers:
        raise ValueError("the model has no QR-LoRA layers to save (call apply_qrlora first)")
    if adapter_name is None:
        adapter_name = default_adapter_name(model)
    row = adapter_row(model, adapter_name)
    if is_main_process is None:
        is_main_process = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_rank() == 0
    # An adapter load_adapter loaded keeps its own modules and ranks (and config), not those of the layers it
    # shares with adapters loaded before it, which may be wider or cover more modules: it would no longer load
    # beside its original. Coefficients trained since beyond its rank, or in layers it did not cover, are kept.
    record = (getattr(model, ADAPTER_FILES_ATTR, None) or {}).get(adapter_name)
    config = getattr(model, CONFIG_ATTR, None) if record is None else record["config"]
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    diverged: list[str] = []
    rounded: list[str] = []  # layers merged and unmerged since their weight was W0
    for module_path, layer in layers:
        name = canonical_name(module_path)
        if getattr(layer, "merged", False):
            raise ValueError(f"{name}: layer is merged; unmerge() it before saving, so its base weight is W0")
        r = int(layer.rank)
        # Gathered once each: under FSDP2 every _full is a collective.
        lam_rows, weight = _lam_rows(layer), _full(layer.weight)
        if lam_rows.shape[-1] != r or tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"{name}: its parameters are flattened or sharded (FSDP1's FullyShardedDataParallel); "
                             f"save inside FullyShardedDataParallel.summon_full_params(model) on every rank, before "
                             f"wrapping, or use FSDP2's fully_shard")
        own_info = None
        if record is not None:
            nonzero = lam_rows[row].nonzero()
            own_info = record["modules"].get(name)
            r = max(int(own_info["rank"]) if own_info else 0, int(nonzero.max()) + 1 if nonzero.numel() else 0)
            if r == 0:
                continue  # a layer this adapter does not use
        lam = lam_rows[row][:r].to("cpu").clone()
        if not torch.isfinite(lam).all():
            diverged.append(name)
        pivots = layer.perm[:r].to("cpu", torch.int32).clone()
        own = {"lam": lam, "pivots": pivots}
        if include_basis:
            for key in layer.held_basis_buffers:
                basis = _full(getattr(layer, key))
                own[key] = (basis[:, :r] if key == "Q" else basis[:r]).to("cpu").contiguous().clone()
        tensors.update({f"{name}.{key}": t for key, t in own.items()})
        # The rule that chose the rank: the layer's where the adapter has the layer's rank, else the adapter's own
        # where it kept its rank (else unknown: training went past it).
        rule_keys = ("tau", "energy", "energy_captured")
        if r == int(layer.rank):
            rule = {key: getattr(layer, key, None) for key in rule_keys}
        elif own_info and int(own_info["rank"]) == r:
            rule = {key: own_info.get(key) for key in rule_keys}
        else:
            rule = {"tau": None, "energy": getattr(layer, "energy", None), "energy_captured": None}
        if layer.holds_unmerged_weight():
            rounded.append(name)
        modules[name] = {
            "rank": r, "in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None, **rule,
            "dtype": _dtype_name(weight.dtype),
            "lam_dtype": _dtype_name(lam.dtype), "fingerprint": base_fingerprint(weight),
            "checksum": _checksum(own),
        }
        if layer.R is None:  # written only when set, so that other adapters stay readable by older versions
            modules[name]["store_r"] = False
    saved_modules: dict[str, str] = {}
    by_name = modules_by_canonical_name(model)
    copies = module_copies(model)
    for name in copies.owned_by(adapter_name):  # this adapter's copies (the module's values where they are its)
        state = {k: _full(v).to("cpu").contiguous().clone()
                 for k, v in copies.values(model, name, adapter_name).items()}
        tensors.update({f"{SAVED_PREFIX}{name}.{k}": v for k, v in state.items()})
        saved_modules[name] = _checksum(state)
        if _first_non_finite(state, by_name[name][1]) is not None:
            diverged.append(f"{name} (modules_to_save)")

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "adapter_name": adapter_name,
        "config": config.to_dict() if isinstance(config, QRLoraConfig) else None,
        "include_basis": bool(include_basis), "modules": modules, "modules_to_save": saved_modules,
        "base_model_name_or_path": base_model_name(model),
    }
    if rounded:
        warnings.warn(f"adapter {adapter_name!r}: {len(rounded)} layer(s) ({', '.join(rounded[:3])}"
                      f"{', ...' if len(rounded) > 3 else ''}) were merged and unmerged, which gives W0 back up to "
                      f"rounding only: the adapter names that rounded weight, and load_adapter will refuse the "
                      f"original base model. Save adapters before merging (or merge a copy: merge_and_unload, "
                      f"to_linear)", UserWarning, stacklevel=2)
    if diverged:  # written all the same (a diverged run is worth keeping to look at); load_adapter refuses it
        what = "lam holds" if not any(d.endswith("(modules_to_save)") for d in diverged) else \
            "lam or a modules_to_save parameter holds"
        warnings.warn(f"adapter {adapter_name!r}: {what} NaN or Inf in {len(diverged)} module(s) "
                      f"({', '.join(diverged[:3])}{', ...' if len(diverged) > 3 else ''}): training diverged; "
                      f"load_adapter will refuse this adapter", UserWarning, stacklevel=2)
    out = Path(path)
    weights_path, config_path = out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG
    if not is_main_process:
        return {"weights": weights_path, "config": config_path}
    if (out / "config.json").is_file():
        warnings.warn(f"{out} holds a transformers model (config.json): with peft installed, from_pretrained of this "
                      f"folder will take {ADAPTER_CONFIG} for a PEFT adapter and fail; save the adapter in a folder of "
                      f"its own (QRLoraCheckpointCallback uses a qrlora-adapter subfolder)", UserWarning, stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    # One write of the pair: an error or an interrupt between the two files leaves the previous adapter whole.
    atomic_write_files({weights_path: safetensors_save(tensors, metadata={"format": FORMAT}),
                        config_path: (json.dumps(meta, indent=1) + "\n").encode()})
    return {"weights": weights_path, "config": config_path}


# ------------------------------------------------------------------------------------------ load
def _read_config(config_path: Path) -> dict:
    if not config_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {config_path.parent}")
    try:
        meta = json.loads(config_path.read_text())
    # ValueError: JSONDecodeError, and an integer past Python's digit limit; RecursionError: arrays nested too deep.
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{config_path} is truncated or corrupt: {type(err).__name__}: {err}") from None
    if isinstance(meta, dict) and "peft_type" in meta and meta.get("format") != FORMAT:
        # The same file name as PEFT's adapters: say which kind this one is and what reads it.
        raise ValueError(f"{config_path} is a PEFT adapter config (peft_type {meta['peft_type']!r}), not a QR-LoRA "
                         f"one: load it with peft.PeftModel.from_pretrained")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("modules"), dict):
        raise ValueError(f"{config_path} is not a QR-LoRA adapter config (format {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {meta.get('format_version')}; "
                         f"this qrlora_kernels reads version {FORMAT_VERSION}")
    if not meta["modules"]:  # save_adapter never writes one: a model without QR-LoRA layers is refused there
        raise ValueError(f"{config_path} is corrupt: it lists no adapted modules")
    if not isinstance(meta.get("include_basis", False), bool):
        raise ValueError(f"{config_path} is corrupt: 'include_basis' is not true or false")
    if not isinstance(meta.get("adapter_name") or DEFAULT_ADAPTER, str):
        raise ValueError(f"{config_path} is corrupt: 'adapter_name' is not a string")
    for name, info in meta["modules"].items():
        _check_module_info(name, info, config_path)
    if not isinstance(meta.get("modules_to_save") or {}, dict):
        raise ValueError(f"{config_path} is corrupt: modules_to_save is not a mapping")
    # Parsed here, before the model is touched: a bad or newer config must not leave it half-converted.
    if meta.get("config") is not None:
        try:
            meta["config"] = QRLoraConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_path}: its QR-LoRA config cannot be read by this version of "
                             f"qrlora_kernels: {err}") from None
    return meta


_MODULE_FIELDS = {"rank": int, "in_features": int, "out_features": int, "fingerprint": dict, "checksum": str}
_FINGERPRINT_FIELDS = {"shape": list, "dtype": str, "sample_hash": str, "sum": (int, float), "sum_sq": (int, float)}


def _bad_field(entry, fields: dict) -> Optional[str]:
    """The first of ``fields`` (name -> type) that ``entry`` lacks or holds with another type (bools never count
    as numbers); None when all are there."""
    for key, kind in fields.items():
        value = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            return key
    return None


def _check_module_info(name: str, info, config_path: Path) -> None:
    """Every field the loader reads is there and has its type: a hand-edited or damaged config names the module."""
    if not isinstance(info, dict):
        raise ValueError(f"{name}: {config_path} is corrupt: its entry is not a mapping")
    for fields, where, prefix in ((_MODULE_FIELDS, info, ""), (_FINGERPRINT_FIELDS, info.get("fingerprint"),
                                                                 "fingerprint.")):
        bad = _bad_field(where, fields)
        if bad is not None:
            kind = fields[bad]
            raise ValueError(f"{name}: {config_path} is corrupt: {prefix + bad!r} is missing or not a "
                             f"{getattr(kind, '__name__', 'number')}")
    rounded = info["fingerprint"].get("rounded", {})
    if not isinstance(rounded, dict) or any(_bad_field(fp, _FINGERPRINT_FIELDS) for fp in rounded.values()):
        raise ValueError(f"{name}: {config_path} is corrupt: 'fingerprint.rounded' is damaged")
    if "moment" in info["fingerprint"] and _bad_field(info["fingerprint"], {"moment": (int, float)}):
        raise ValueError(f"{name}: {config_path} is corrupt: 'fingerprint.moment' is not a number")
    for fingerprint in [info["fingerprint"], *rounded.values()]:
        try:
            _dtype_from_name(fingerprint["dtype"])
        except ValueError:
            raise ValueError(f"{name}: {config_path} is corrupt: its fingerprint names an unknown dtype "
                             f"{fingerprint['dtype']!r}") from None
    if not isinstance(info.get("store_r", True), bool):
        raise ValueError(f"{name}: {config_path} is corrupt: 'store_r' is not true or false")
    # Shown by the layer's repr and report (tau, energy_captured) and naming its rank rule (energy).
    # (energy_captured has no upper bound: at full rank it is 1 up to the rounding of the weight's precision.)
    for key, valid, what in (("tau", lambda v: 0 < v <= 1, "in (0, 1]"),
                             ("energy_captured", lambda v: 0 <= v < math.inf, "finite and >= 0")):
        value = info.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not valid(value)):
            raise ValueError(f"{name}: {config_path} is corrupt: {key!r} is {value!r}, not a number {what} or null")
    if info.get("energy") not in (None, *ENERGY_RULES):
        raise ValueError(f"{name}: {config_path} is corrupt: 'energy' is {info['energy']!r}, not "
                         f"{' or '.join(map(repr, ENERGY_RULES))}")


def _diagnose_safetensors(path: Path) -> str:
    """Which modules a damaged safetensors file lost, read from its header where possible."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"the file is {size} bytes, too short for a header; every module is missing"
        (header_len,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError, MemoryError, OverflowError):  # (UnicodeDecodeError is a ValueError)
            return "its header is unreadable"
    available = size - 8 - header_len

    def end_offset(entry) -> Optional[int]:
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        return offsets[1] if ok else None
    if not isinstance(header, dict) or any(end_offset(entry) is None for key, entry in header.items()
                                           if key != "__metadata__"):
        return "its header is not a safetensors header"
    lost = sorted({key.rsplit(".", 1)[0] for key, entry in header.items()
                   if key != "__metadata__" and end_offset(entry) > available})
    lost = [name[len(SAVED_PREFIX):].rsplit(".", 1)[0] if name.startswith(SAVED_PREFIX) else name for name in lost]
    if lost:
        return f"data missing for module(s) {', '.join(sorted(set(lost)))}"
    return "its header does not match its data"


def _first_non_finite(state: dict[str, torch.Tensor], module: nn.Module) -> Optional[str]:
    """The first (by name) of ``module``'s parameters in its ``state`` holding NaN or Inf; None when there is none.
    Buffers are not checked: an infinite one can be meant (a mask of -inf)."""
    parameters = {name for name, _ in module.named_parameters()}
    return next((key for key in sorted(state) if key in parameters and state[key].is_floating_point()
                 and not bool(torch.isfinite(state[key]).all())), None)


def _check_tensors_accounted(tensors: dict, meta: dict, weights_path: Path) -> None:
    """Every tensor of the weights file belongs to a module the config lists: a config that lost an entry (or a
    weights file of another save) would otherwise load without those modules, silently."""
    include_basis = bool(meta.get("include_basis"))
    expected = {f"{name}.{key}" for name, info in meta["modules"].items()
                for key in ["lam", "pivots"] + (_basis_keys(_stores_r(info)) if include_basis else [])}
    prefixes = tuple(f"{SAVED_PREFIX}{name}." for name in (meta.get("modules_to_save") or {}))
    extra = sorted(key for key in tensors if key not in expected and not (prefixes and key.startswith(prefixes)))
    if extra:
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise ValueError(f"{weights_path} holds {len(extra)} tensor(s) that {ADAPTER_CONFIG} does not list ({shown}): "
                         f"the two files are not from one save, or the config was edited")


def _read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {weights_path.parent}")
    try:
        return load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types, by version
        raise ValueError(f"{weights_path} is truncated or corrupt ({_diagnose_safetensors(weights_path)}; "
                         f"safetensors: {err})") from None


def _basis_keys(store_r: bool) -> list[str]:
    """The basis tensors an include_basis file holds for a module (a layer's ``held_basis_buffers``)."""
    return ["Q", "R"] if store_r else ["Q"]


def _stores_r(info: dict) -> bool:
    """Whether the module's layer keeps R (``_check_module_info`` has checked the field's type)."""
    return info.get("store_r", True)


def _module_tensors(tensors: dict, name: str, info: dict, include_basis: bool, path: Path) -> dict:
    keys = ["lam", "pivots"] + (_basis_keys(_stores_r(info)) if include_basis else [])
    missing = [k for k in keys if f"{name}.{k}" not in tensors]
    if missing:
        raise ValueError(f"{name}: {path} lacks its tensor(s) {missing} (truncated or corrupt adapter)")
    own = {k: tensors[f"{name}.{k}"] for k in keys}
    if _checksum(own) != info.get("checksum"):
        raise ValueError(f"{name}: its stored tensors do not match their checksum: {path} is corrupt")
    r = int(info["rank"])
    if own["lam"].shape != (r,) or own["pivots"].shape != (r,):
        raise ValueError(f"{name}: lam/pivots have shapes {tuple(own['lam'].shape)}/{tuple(own['pivots'].shape)}, "
                         f"expected ({r},)")
    if not own["lam"].is_floating_point():
        raise ValueError(f"{name}: lam is stored as {own['lam'].dtype}, which cannot be honoured as coefficients")
    if own["pivots"].dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: its pivots are stored as {own['pivots'].dtype}, not as integers: {path} is "
                         f"corrupt")
    if not torch.isfinite(own["lam"]).all():
        i = int((~torch.isfinite(own["lam"])).nonzero()[0])
        raise ValueError(f"{name}: lam[{i}] is {own['lam'][i].item()} in {path}: the adapter was saved from a "
                         f"diverged training run, and would make every output of the layer NaN")
    expected = {"Q": (int(info["out_features"]), r), "R": (r, int(info["in_features"]))}
    for key in set(expected) & set(own):
        if tuple(own[key].shape) != expected[key] or not own[key].is_floating_point():
            raise ValueError(f"{name}: its stored basis {key} is {tuple(own[key].shape)} {own[key].dtype}, "
                             f"expected a floating-point {expected[key]} for rank {r} ({path} is inconsistent)")
    return own


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], *, adapter_name: Optional[str] = None,
                 revision: Optional[str] = None, token: Union[str, bool, None] = None,
                 progress: Optional[bool] = None, store_r: Optional[bool] = None) -> dict[str, int]:
    """Load an adapter saved by ``save_adapter``; returns the model's mapping adapter name -> id.

    ``path`` is the adapter's folder or, when no such path exists, a Hugging Face Hub repository id
    (``"user/repo"``, as ``push_adapter_to_hub`` writes; ``revision`` and ``token`` as in ``huggingface_hub``).
    ``progress``: a tqdm bar over the modules while their bases are rebuilt (None: where tqdm would show it).

    On a base model (plain ``nn.Linear`` layers) each adapted module is rebuilt from its
    pivots and the model's own weights, which must be those the adapter was made on. On a
    model that already has QR-LoRA layers, the adapter is loaded under ``adapter_name``
    (default: the name it was saved under): a known name is overwritten, a new one becomes
    another row of every layer's ``lam``, selectable per sequence with ``adapter_batch``. An
    adapter whose pivots are a prefix of a layer's (a lower ``tau`` on the same weights)
    shares that layer's basis, its missing coefficients being zero.
    Its ``modules_to_save`` become its own copies (``modules_to_save.py``): the modules hold them while the model
    computes with this adapter.

    ``store_r``: whether the layers built here keep R (None: as each module was saved). ``False`` gives Q-only
    layers (``QRLoraLinear(store_r=False)``, about half the basis memory) whatever the file holds, e.g. to serve
    adapters trained with R; the coefficients fit either kind. Layers the model already has stay as they are.
    """
    if store_r is not None and not isinstance(store_r, bool):
        raise TypeError(f"store_r must be True, False or None, got {store_r!r}")
    wrapper = parameter_holding_wrapper(model)
    model = unwrap_model(model)
    refuse_bare_layer(model, "load_adapter")
    from .hub import resolve_adapter_folder
    folder = resolve_adapter_folder(path, revision=revision, token=token)
    meta = _read_config(folder / ADAPTER_CONFIG)
    tensors = _read_tensors(folder / ADAPTER_WEIGHTS)
    _check_tensors_accounted(tensors, meta, folder / ADAPTER_WEIGHTS)
    include_basis = bool(meta.get("include_basis"))
    name_to_load = adapter_name if adapter_name is not None else meta.get("adapter_name") or DEFAULT_ADAPTER
    if not isinstance(name_to_load, str) or not name_to_load:
        raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
    QRLoraLinear = _layer_class()
    from .layer import as_linear, is_conv1d
    unreachable = {canonical_name(n) for n in _read_by_parent(model)}
    saved_meta = meta.get("modules_to_save") or {}
    ids = dict(getattr(model, ADAPTER_IDS_ATTR, None) or {})
    fresh = not ids and not qrlora_layers(model)
    if wrapper is not None and (fresh or name_to_load not in ids):
        raise ValueError(f"load adapters before wrapping the model in {wrapper}: it keeps the parameters it was "
                         f"given, and the new lam parameters would not be synchronised (only an adapter already "
                         f"loaded under this name can be overwritten in place)")
    # Every QR-LoRA layer's lam changes (a new row, or the row overwritten), and a merged layer's weight holds its
    # lam: refused before anything changes, not only where the file has the module.
    for merged_path, merged_layer in qrlora_layers(model):
        if getattr(merged_layer, "merged", False):
            raise ValueError(f"{canonical_name(merged_path)}: layer is merged; unmerge() it before loading "
                             f"another adapter")
    if name_to_load not in ids:
        ids[name_to_load] = len(ids)
    row, num_adapters = ids[name_to_load], len(ids)
    by_name = modules_by_canonical_name(model)

    # Check and build everything before changing the model, so a bad adapter leaves it untouched.
    copies = module_copies(model)
    # The modules other adapters train in full (those only the adapter being replaced trains go with it).
    trained_by_others = [n for n in copies.names() if set(copies.owners(n)) - {name_to_load}]
    # New lam (and copies taken in) train unless the model was frozen for serving.
    trainable = fresh or lam_trains(model)
    plan, model_names = [], {}
    with module_progress(len(meta["modules"]), progress, "QR-LoRA adapter modules") as bar:
        for name, info in meta["modules"].items():
            found = _backbone_name(model, name, by_name)
            if found is None:
                raise ValueError(f"{name}: module not found in the model (the adapter was made for another "
                                 f"architecture)")
            model_names[name] = found
            module_path, module = by_name[found]
            trained_around = found if found in copies.names() else _nested_with(found, copies.names())
            what = "it" if trained_around == found else f"{trained_around}, which holds it,"
            if trained_around in trained_by_others:
                raise ValueError(f"{name}: adapter(s) {', '.join(map(repr, copies.owners(trained_around)))} train "
                                 f"{what} in full (modules_to_save): another adapter cannot adapt it")
            if trained_around is not None and copies.held_by(trained_around) is not BASE:
                # Only the adapter being replaced trains it, but the module holds that copy, not the base values
                # this adapter was made on and would be built from.
                way_out = (f"set_adapter to another adapter (or delete_adapter({name_to_load!r})) first"
                           if set(ids) - {name_to_load} else "unload(model) first, or load it into a fresh base model")
                raise ValueError(f"{name}: adapter {name_to_load!r}, being replaced, trains {what} in full "
                                 f"(modules_to_save), and the model computes with that copy: {way_out}")
            if not isinstance(module, (nn.Linear, QRLoraLinear)) and not is_conv1d(module):
                raise ValueError(f"{name}: expected an nn.Linear or QRLoraLinear, found {type(module).__name__}")
            if found in unreachable:
                raise ValueError(f"{name} is the out_proj of an nn.MultiheadAttention, which reads its weight directly "
                                 f"and never calls its forward: the adapter would be ignored (until merged)")
            _refuse_unloaded_weight(name, module)
            if is_conv1d(module):
                module = as_linear(module)  # W^T as an nn.Linear; the layer built on it replaces the Conv1D
            if (module.out_features, module.in_features) != (info["out_features"], info["in_features"]):
                raise ValueError(f"{name}: the model's layer is {module.out_features}x{module.in_features}, "
                                 f"the adapter's {info['out_features']}x{info['in_features']}")
            if any(_is_sharded(t) for t in module.parameters()):
                raise ValueError(f"{name}: its parameters are sharded (FSDP2 fully_shard); load the adapter into the "
                                 f"model before sharding it")
            problem = _fingerprint_problem(module.weight, info["fingerprint"])
            if problem:
                raise ValueError(f"{name}: {problem}")
            own = _module_tensors(tensors, name, info, include_basis, folder / ADAPTER_WEIGHTS)
            if isinstance(module, QRLoraLinear):
                r_new, r_layer = int(info["rank"]), int(module.rank)
                pivots = own["pivots"].to(device=module.perm.device, dtype=torch.int64)
                if r_new > r_layer or not torch.equal(module.perm[:r_new], pivots):
                    raise ValueError(f"{name}: the adapter's basis (rank {r_new}) is not the leading part of the "
                                     f"model's QR-LoRA basis (rank {r_layer}): adapters of one batch must share the "
                                     f"basis; merge_and_unload or reload the base model first")
                layer = module
            else:
                try:
                    layer = _build_layer(module, own, info, include_basis, num_adapters, store_r)
                except (ValueError, RuntimeError) as err:
                    raise ValueError(f"{name}: cannot rebuild the basis from the stored pivots: {err}") from None
            cast = own["lam"].to(layer.lam.dtype)
            if not bool(torch.isfinite(cast).all()):
                i = int((~torch.isfinite(cast)).nonzero()[0])
                raise ValueError(f"{name}: lam[{i}] = {own['lam'][i].item():.6g} overflows the layer's {cast.dtype}")
            # A torch.compile'd Linear calls the module it compiled, whatever its _orig_mod is later: the new layer
            # replaces the compiled wrapper itself (a wrapper inside a compiled block is re-traced instead).
            while module_path.rpartition(".")[2] == "_orig_mod":
                module_path = module_path.rpartition(".")[0]
            plan.append((module_path, module, layer, own, found))
            bar.update()
    layer_names = [canonical_name(n) for n, _ in qrlora_layers(model)] + [found for *_, found in plan]
    saved_plan = []  # (the model's module name, its state from the file) per modules_to_save entry, checked
    for name, checksum in saved_meta.items():
        state = {k[len(SAVED_PREFIX) + len(name) + 1:]: v for k, v in tensors.items()
                 if k.startswith(f"{SAVED_PREFIX}{name}.")}
        if _checksum(state) != checksum:
            raise ValueError(f"{name}: the stored modules_to_save tensors are missing or corrupt")
        found = _backbone_name(model, name, by_name)
        if found is None:
            raise ValueError(f"{name}: module (modules_to_save) not found in the model")
        model_names[name] = found
        # A module another adapter trains in full, or one holding QR-LoRA layers, cannot be nested with this one:
        # taking one's copy in would overwrite part of the other.
        other = _nested_with(found, [n for n in trained_by_others if n != found], inside_too=True)
        if other is not None:
            raise ValueError(f"{name} (modules_to_save) and {other}, which adapter(s) "
                             f"{', '.join(map(repr, copies.owners(other)))} train in full, lie one inside the other: "
                             f"their copies would overwrite each other")
        adapted = found if found in layer_names else _nested_with(found, layer_names, inside_too=True)
        if adapted is not None:
            what = "is" if adapted == found else "holds"
            raise ValueError(f"{name} (modules_to_save) {what} the QR-LoRA layer {adapted}: an adapter cannot train "
                             f"in full a module that adapters adapt")
        target = by_name[found][1]
        expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in state.items()}
        if expected != stored:
            diff = sorted(f"{k}: model {expected.get(k)}, adapter {stored.get(k)}"
                          for k in set(expected) | set(stored) if expected.get(k) != stored.get(k))
            raise ValueError(f"{name}: the adapter's modules_to_save tensors do not fit the model's module "
                             f"({'; '.join(diff)}), e.g. a classifier made for another number of labels")
        bad = _first_non_finite(state, target)
        if bad is not None:
            raise ValueError(f"{name}: its modules_to_save parameter {bad!r} holds NaN or Inf: the adapter was saved "
                             f"from a diverged training run")
        saved_plan.append((found, state))
    if name_to_load == active_adapter_name(model) and not fresh:  # its copies are written into the modules below
        for found in sorted({found for found, _ in saved_plan} | set(copies.owned_by(name_to_load)) & set(by_name)):
            refuse_sharded(model, by_name[found][1], found, wrapper)
    if wrapper is not None and name_to_load == active_adapter_name(model) and \
            {found for found, _ in saved_plan} != set(copies.owned_by(name_to_load)):
        raise ValueError(f"adapter {name_to_load!r}, which the model computes with, would train other "
                         f"modules_to_save ({', '.join(sorted({f for f, _ in saved_plan})) or 'none'} instead of "
                         f"{', '.join(copies.owned_by(name_to_load)) or 'none'}), and {wrapper} keeps the set of "
                         f"trained parameters it was given: load it before wrapping the model")

    if fresh:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, layer in qrlora_layers(model):
        _resize_adapters(layer, num_adapters)
    for name, module, layer, own, _ in plan:
        if layer is not module:
            layer.lam.requires_grad_(trainable)
            _set_submodule(model, name, layer)
        _write_lam_row(layer, row, own["lam"])
    # An adapter is whole: overwriting a name clears that row where the new file has no coefficients (a layer
    # the new adapter does not touch), instead of keeping the old adapter's values there.
    covered = {id(layer) for _, _, layer, _, _ in plan}
    for _, layer in qrlora_layers(model):
        if id(layer) not in covered:
            _write_lam_row(layer, row, torch.zeros(0))

    if fresh or not hasattr(model, CONFIG_ATTR):
        config = meta.get("config")
        if isinstance(config, QRLoraConfig) and store_r is not None:
            config = dataclasses.replace(config, store_r=store_r)
        setattr(model, CONFIG_ATTR, config)
    setattr(model, ADAPTER_IDS_ATTR, ids)
    files = dict(getattr(model, ADAPTER_FILES_ATTR, None) or {})
    files[name_to_load] = {"config": meta.get("config"), "modules": {
        model_names[name]: {key: info.get(key) for key in ("rank", "tau", "energy", "energy_captured")}
        for name, info in meta["modules"].items()}}
    setattr(model, ADAPTER_FILES_ATTR, files)
    # The model computes with the adapter set_adapter chose, else the first loaded (row 0, where layers built here
    # start), in every layer and with its modules_to_save copies. Each adapter keeps its own copies (a copy the
    # name had before goes, where the new file has none); a module holds the base values for one without.
    active = active_adapter_name(model)
    if getattr(model, ACTIVE_ADAPTER_ATTR, None) == active:
        for _, layer in qrlora_layers(model):
            layer.active_adapter = ids[active]
    for found, state in saved_plan:
        copies.set_copy(model, found, name_to_load, state)
    copies.drop(model, name_to_load, keep=frozenset(found for found, _ in saved_plan))
    copies.hold(model, active, trainable=trainable, wrapper=wrapper)
    setattr(model, MODULES_TO_SAVE_ATTR, copies)
    skip_bases_in_hf_checkpoints(model)
    keep_gradients_through_reentrant_checkpoints(model, adapted=True)
    return dict(ids)


def _nested_with(name: str, others, *, inside_too: bool = False) -> Optional[str]:
    """The first of ``others`` that holds module ``name`` (or, ``inside_too``, that ``name`` holds)."""
    for other in others:
        if name.startswith(other + ".") or (inside_too and other.startswith(name + ".")):
            return other
    return None


def _backbone_name(model: nn.Module, name: str, by_name: dict) -> Optional[str]:
    """The model's name for the adapter's module ``name``: itself, or across transformers' ``base_model_prefix``
    (an adapter made on ``BertModel`` names ``encoder.layer.0...``, ``BertForSequenceClassification`` holds it
    as ``bert.encoder.layer.0...``, and the reverse), as ``from_pretrained`` maps a checkpoint's weights."""
    if name in by_name:
        return name
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix:
        return None
    for candidate in (f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(f"{prefix}.") else None):
        if candidate in by_name:
            return candidate
    return None


def _build_layer(linear: nn.Linear, own: dict, info: dict, include_basis: bool, num_adapters: int,
                 store_r: Optional[bool] = None) -> nn.Module:
    from .basis import basis_from_pivots
    QRLoraLinear = _layer_class()
    weight = linear.weight
    pivots = own["pivots"].to(device=weight.device, dtype=torch.int64)
    saved_r = _stores_r(info)
    store_r = saved_r if store_r is None else store_r
    if include_basis:
        Q = own["Q"].to(device=weight.device, dtype=weight.dtype)
        if not store_r:
            R = None
        elif saved_r:
            R = own["R"].to(device=weight.device, dtype=weight.dtype)
        else:  # a Q-only file onto a layer that keeps R: R = Q^T W0, as the saved layer computed it
            R = implied_r(weight.detach(), Q, acc_dtype(weight.dtype)).to(weight.dtype)
    else:
        Q, R = basis_from_pivots(weight, pivots)
    layer = QRLoraLinear.from_basis(linear, (Q, R, pivots), tau=info.get("tau"), energy=info.get("energy") or "diag",
                                    num_adapters=num_adapters, store_r=store_r)
    layer.energy_captured = info.get("energy_captured")
    return layer
