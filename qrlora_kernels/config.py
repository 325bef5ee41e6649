"""``QRLoraConfig``: which modules of a model become QR-LoRA layers, and how their rank is chosen.

Follows the conventions of Hugging Face PEFT's tuner configs (``target_modules``,
``exclude_modules``, ``modules_to_save``, ``task_type``); PEFT's ``layers_to_transform`` is
accepted for ``layers``, and LoRA-only fields (``r``, ``lora_alpha``, ...) are refused with their
QR-LoRA counterpart named. Module selection lives here (``QRLoraConfig.is_target``) so that
``model.py`` only finds and replaces modules.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import re
from typing import Any, Iterable, Optional, Union

from .basis import QR_METHODS

ALL_LINEAR = "all-linear"
# Fields added after the first file format, with their defaults: written only when set otherwise, so that files
# that do not use them stay readable by versions without them.
_LATER_FIELDS = {"task_type": None, "store_r": True}
DEFAULT_TAU = 0.9
ENERGY_RULES = ("diag", "frobenius")
# Containers whose numbered children are the model's layers (BERT "layer.3.", Llama "layers.3.", GPT-2 "h.3.").
DEFAULT_LAYERS_PATTERN = ("layer", "layers", "h", "blocks", "block")
# PEFT's task types whose model carries a freshly initialised head, and that head's usual names (PEFT adds
# the same ones to modules_to_save). Other task types (CAUSAL_LM, SEQ_2_SEQ_LM, ...) add nothing.
# PEFT's own list is classifier and score; classification_head is BART's, T5's and other encoder-decoders'.
SEQ_CLS_HEADS = ("classifier", "score", "classification_head")
TASK_HEADS = {"SEQ_CLS": SEQ_CLS_HEADS, "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
# PEFT LoraConfig fields that QR-LoRA has no use for: refused with what replaces them here.
LORA_ONLY_FIELDS = {
    "r": "QR-LoRA's rank comes from tau (energy threshold), rank= or a global budget=",
    "lora_alpha": "QR-LoRA has no scaling: the trained lam are the update's coefficients",
    "lora_dropout": "QR-LoRA has no adapter dropout",
    "use_rslora": "QR-LoRA has no scaling",
    "use_dora": "DoRA is another method",
    "init_lora_weights": "lam always starts at 0 (the converted model equals the original)",
    "fan_in_fan_out": "transformers' Conv1D layers (GPT-2) are recognised and handled without it",
    "bias": "QR-LoRA keeps every bias frozen (bias='none', PEFT's default, is accepted); put a module in "
            "modules_to_save to train it",
    "rank_pattern": "per-module ranks come from tau, or from a global budget= across modules",
    "alpha_pattern": "QR-LoRA has no scaling",
    "inference_mode": "for inference, merge_and_unload(model) folds the adapter into the weights, or "
                      "model.requires_grad_(False) freezes lam",
}


def _as_name_list(value, field: str, *, regex: bool = True) -> Optional[Union[str, list[str]]]:
    """None, a regex string (a name when not ``regex``), or a list of name suffixes; anything else is a clear
    TypeError, and a regex that does not compile a ValueError."""
    if value is None:
        return value
    if isinstance(value, str):
        if regex and value != ALL_LINEAR:
            # Compiled now, so that a typo is named here rather than raised as re.error by apply_qrlora.
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{field} is not a valid regular expression: {value!r} ({err})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        # Checked before a set is sorted: sorting str with anything else fails without naming the field.
        bad = [n for n in value if not isinstance(n, str) or not n]
        if bad:
            raise TypeError(f"{field} must contain non-empty module names (str), got {bad!r}")
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{field} must be None, a regex string or a list of module names, got {type(value).__name__}")


def _name_matches(name: str, spec: Union[str, list[str]]) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches exact names or name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == target or name.endswith("." + target) for target in spec)


@dataclasses.dataclass
class QRLoraConfig:
    """Configuration of QR-LoRA adapters for a whole model.

    Args:
        target_modules: the ``nn.Linear`` modules to adapt. A list of names or name suffixes
            (``["query", "value"]`` matches ``encoder.layer.0.attention.self.query``), a regex
            matched against the full module name, or ``"all-linear"``: every ``nn.Linear``
            except the output head (the module returned by ``get_output_embeddings()``, and
            everything inside a ``classifier`` / ``score`` head), as in PEFT.
        exclude_modules: names (same forms as ``target_modules``, but not ``"all-linear"``)
            never adapted, even when targeted.
        layers: layer indices to adapt (an int or a list); ``None`` adapts every layer. The index
            is read from names like ``layer.3.`` / ``layers.3.`` / ``h.3.`` (see ``layers_pattern``);
            a targeted module outside any numbered layer is skipped when ``layers`` is set.
        layers_pattern: the container names whose numbered children are layers.
        tau: the energy fraction that sets each module's rank (0 < tau <= 1). Defaults to 0.9
            when neither ``rank`` nor ``budget`` is given.
        rank: a fixed rank for every module (capped at ``min(in, out)``); exclusive with ``tau``
            and ``budget``.
        energy: ``"diag"`` (the paper's rule: the smallest r with sum_{i<=r} R_ii^2 >= tau * sum_i R_ii^2,
            which needs the full factorisation) or ``"frobenius"`` (1 - ||R22||_F^2 / ||W||_F^2 >= tau,
            which lets the factorisation stop early).
        budget: a global number of trainable scalars. The ``budget`` components with the largest
            normalised energy ``R_ii^2 / sum_j R_jj^2`` (per module) across *all* targeted modules
            are kept, so the model trains exactly ``budget`` scalars. Needs ``energy="diag"``;
            exclusive with ``tau`` and ``rank``. A targeted module that receives no component
            stays a plain ``nn.Linear``.
        modules_to_save: modules (names or suffixes, e.g. ``["classifier"]``) that stay fully
            trainable and are stored in the adapter file, like PEFT's ``modules_to_save``.
        task_type: PEFT's task type. ``"SEQ_CLS"`` / ``"TOKEN_CLS"`` also train and save the model's
            ``classifier`` / ``score`` head, ``"QUESTION_ANS"`` its ``qa_outputs`` (freshly initialised
            heads, as PEFT does); other types change nothing.
        qr_method: the pivoting of the factorisations: ``"geqp3"`` (the paper's deterministic column
            pivoting; default) or ``"randomized"`` (pivots from a random sketch, about the speed of an
            unpivoted QR; a fixed seed keeps it reproducible). Not with ``budget``. See
            ``qrlora_kernels.basis``.
        store_r: keep each layer's R (default). ``False`` keeps Q only, halving the basis's memory
            (R's rows are Q^T W0 for a pivoted-QR basis; see ``QRLoraLinear``): the same outputs to
            rounding, for some extra work per step (``qrlora_kernels.dispatch``).
    """

    target_modules: Optional[Union[str, list[str]]] = None
    exclude_modules: Optional[Union[str, list[str]]] = None
    layers: Optional[Union[int, list[int]]] = None
    layers_pattern: Optional[Union[str, list[str]]] = None
    tau: Optional[float] = None
    rank: Optional[int] = None
    energy: str = "diag"
    budget: Optional[int] = None
    modules_to_save: Optional[list[str]] = None
    qr_method: str = "geqp3"
    task_type: Optional[str] = None
    store_r: bool = True
    # PEFT's name for ``layers``: when given (also to ``dataclasses.replace``) it sets ``layers``.
    layers_to_transform: dataclasses.InitVar[Optional[Union[int, list[int]]]] = None

    def __post_init__(self, layers_to_transform=None):
        if layers_to_transform is not None:
            self.layers = layers_to_transform
        if self.target_modules is None:
            raise ValueError("target_modules is required: a list of module names, a regex, or 'all-linear'")
        self.target_modules = _as_name_list(self.target_modules, "target_modules")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list: nothing would be adapted")
        self.exclude_modules = _as_name_list(self.exclude_modules, "exclude_modules")
        if self.exclude_modules == ALL_LINEAR:
            raise ValueError("exclude_modules cannot be 'all-linear'")
        if self.modules_to_save is not None:
            saved = _as_name_list(self.modules_to_save, "modules_to_save", regex=False)
            if isinstance(saved, str):
                saved = [saved]
            self.modules_to_save = saved
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, int) else self.layers
            if not isinstance(layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise TypeError(f"layers must be an int or a list of ints, got {self.layers!r}")
            if any(i < 0 for i in layers):
                raise ValueError(f"layers must be non-negative layer indices, got {list(layers)}")
            self.layers = sorted(set(layers))
        if self.layers_pattern is not None:
            # Container names (matched literally, not regexes): one name or a list of them.
            pattern = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not isinstance(pattern, (list, tuple, set, frozenset)):
                raise TypeError(f"layers_pattern must be a container name (str) or a list of them, got "
                                f"{type(self.layers_pattern).__name__} {self.layers_pattern!r}")
            self.layers_pattern = _as_name_list(pattern, "layers_pattern")
        if self.energy not in ENERGY_RULES:
            raise ValueError(f"energy must be one of {ENERGY_RULES}, got {self.energy!r}")
        chosen = [k for k in ("tau", "rank", "budget") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give only one of tau, rank and budget (got {', '.join(chosen)})")
        if not chosen:
            self.tau = DEFAULT_TAU
        if self.tau is not None:
            if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real):
                raise TypeError(f"tau must be a float, got {type(self.tau).__name__}")
            if not 0.0 < float(self.tau) <= 1.0:
                raise ValueError(f"tau must lie in (0, 1], got {self.tau}")
            self.tau = float(self.tau)
        for key in ("rank", "budget"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{key} must be a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{key} must be a positive int, got {value}")
            setattr(self, key, int(value))  # a numpy integer would not go into adapter_config.json
        if self.budget is not None and self.energy != "diag":
            raise ValueError("budget ranks components by their diagonal energy R_ii^2 / sum_j R_jj^2, "
                             "so it needs energy='diag'")
        if self.task_type is not None:
            task = str(getattr(self.task_type, "value", self.task_type))  # PEFT's TaskType enum or its string
            if task not in TASK_TYPES:
                raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
            self.task_type = task
        if not isinstance(self.store_r, bool):
            raise TypeError(f"store_r must be a bool, got {self.store_r!r}")
        if self.qr_method not in QR_METHODS:
            raise ValueError(f"qr_method must be one of {QR_METHODS}, got {self.qr_method!r}")
        if self.budget is not None and self.qr_method != "geqp3":
            raise ValueError("budget needs qr_method='geqp3': it keeps a prefix of each module's energies, "
                             "which only geqp3 guarantees to be decreasing")

    # ------------------------------------------------------------------ module selection
    def layer_index(self, name: str) -> Optional[int]:
        """The layer number in a module name (``encoder.layer.3.attention`` -> 3), or None."""
        containers = self.layers_pattern or list(DEFAULT_LAYERS_PATTERN)
        alternatives = "|".join(re.escape(c) for c in containers)
        found = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
        return int(found.group(1)) if found else None

    def is_target(self, name: str, *, all_linear_excluded: Iterable[str] = ()) -> bool:
        """Whether the module called ``name`` is targeted (its type is checked by the caller)."""
        if self.target_modules == ALL_LINEAR:
            if name in set(all_linear_excluded):
                return False
        elif not _name_matches(name, self.target_modules):
            return False
        if self.exclude_modules is not None and _name_matches(name, self.exclude_modules):
            return False
        if self.layers is not None:
            index = self.layer_index(name)
            if index is None or index not in self.layers:
                return False
        return True

    def is_module_to_save(self, name: str) -> bool:
        """Listed in ``modules_to_save``, or the head that ``task_type`` trains."""
        return self.is_listed_to_save(name) or _name_matches(name, list(self.task_heads()))

    def is_listed_to_save(self, name: str) -> bool:
        """Listed in ``modules_to_save`` itself."""
        return bool(self.modules_to_save) and _name_matches(name, self.modules_to_save)

    def task_heads(self) -> tuple[str, ...]:
        """The head names that ``task_type`` adds to ``modules_to_save`` (matched only where present)."""
        return TASK_HEADS.get(self.task_type, ())

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in _LATER_FIELDS and getattr(self, f.name) == _LATER_FIELDS[f.name])}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QRLoraConfig":
        if not isinstance(data, dict):
            raise TypeError(f"QRLoraConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | {"layers_to_transform"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QRLoraConfig fields: {unknown}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _accept_peft_names(init):
    """Wrap the dataclass ``__init__``: LoRA-only fields get an error that names what replaces them."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if kwargs.get("bias") == "none":  # PEFT's default, and what QR-LoRA does: a ported LoraConfig may keep it
            del kwargs["bias"]
        lora_only = [k for k in kwargs if k in LORA_ONLY_FIELDS]
        if lora_only:
            raise TypeError("QRLoraConfig has no LoRA field " + "; ".join(
                f"{k!r} ({LORA_ONLY_FIELDS[k]})" for k in lora_only))
        init(self, *args, **kwargs)
    return __init__


QRLoraConfig.__init__ = _accept_peft_names(QRLoraConfig.__init__)
