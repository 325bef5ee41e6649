"""QRLoraConfig, apply_qrlora (selection, freezing, report, global budget), merge_and_unload, adapter_batch.

The models here are small stand-ins with transformer-like names; tests/test_hf_models.py runs
real ``transformers`` classes.
"""
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from qrlora_kernels import QRLoraConfig, QRLoraLinear, apply_qrlora, disable_adapters, merge_and_unload
from qrlora_kernels.model import adapter_batch, find_targets, qrlora_layers
from qrlora_kernels.testing import assert_rel_close, rel_error

HIDDEN, FFN = 32, 48


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, h):
        h = self.norm(h + torch.tanh(self.query(h)) * self.value(h))
        return h + self.down(torch.relu(self.up(h)))


class TinyModel(nn.Module):
    """Named like a transformer: ``layers.<i>.query`` ..., an output head ``lm_head``, a ``classifier``."""

    def __init__(self, num_layers=3):
        super().__init__()
        self.embed = nn.Linear(8, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(num_layers))
        self.classifier = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 3))
        self.lm_head = nn.Linear(HIDDEN, 10)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return torch.cat([self.classifier(h[:, 0]), self.lm_head(h).mean(1)], dim=-1)


def _pair(num_layers=3):
    base = TinyModel(num_layers).eval()
    return base, copy.deepcopy(base)


def _names(model, config):
    return [n for n, _ in find_targets(model, config)]


# ------------------------------------------------------------------------------------------ config
def test_config_defaults_and_json_round_trip():
    cfg = QRLoraConfig(target_modules=["query", "value"])
    assert cfg.tau == 0.9 and cfg.rank is None and cfg.budget is None and cfg.energy == "diag"
    for original in (cfg, QRLoraConfig(target_modules=r".*\.(query|value)", layers=[2, 0], modules_to_save="classifier"),
                     QRLoraConfig(target_modules="all-linear", budget=601, exclude_modules=["down"]),
                     QRLoraConfig(target_modules=["up"], rank=4, energy="frobenius"),
                     QRLoraConfig(target_modules=["up"], store_r=False)):
        again = QRLoraConfig.from_dict(__import__("json").loads(original.to_json_string()))
        assert again == original
    # A field added later is written only when it differs from its default (older readers refuse unknown fields).
    assert "store_r" not in cfg.to_dict() and QRLoraConfig(target_modules=["q"], store_r=False).to_dict()["store_r"] is False
    assert QRLoraConfig(target_modules=["q"], layers=3).layers == [3]


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "target_modules is required"),
    ({"target_modules": []}, ValueError, "empty list"),
    ({"target_modules": [1]}, TypeError, "non-empty module names"),
    ({"target_modules": 3}, TypeError, "target_modules must be"),
    ({"target_modules": ["q"], "exclude_modules": "all-linear"}, ValueError, "exclude_modules cannot"),
    ({"target_modules": ["q"], "tau": 0.9, "rank": 4}, ValueError, "only one of tau, rank and budget"),
    ({"target_modules": ["q"], "rank": 4, "budget": 10}, ValueError, "only one of tau, rank and budget"),
    ({"target_modules": ["q"], "tau": 1.5}, ValueError, r"tau must lie in \(0, 1\]"),
    ({"target_modules": ["q"], "tau": "high"}, TypeError, "tau must be a float"),
    ({"target_modules": ["q"], "rank": 0}, ValueError, "rank must be a positive int"),
    ({"target_modules": ["q"], "budget": 2.5}, TypeError, "budget must be a positive int"),
    ({"target_modules": ["q"], "energy": "trace"}, ValueError, "energy must be one of"),
    ({"target_modules": ["q"], "budget": 10, "energy": "frobenius"}, ValueError, "needs energy='diag'"),
    ({"target_modules": ["q"], "layers": [-1]}, ValueError, "non-negative"),
    ({"target_modules": ["q"], "layers": "0"}, TypeError, "layers must be an int or a list"),
    ({"target_modules": ["q"], "qr_method": "svd"}, ValueError, "qr_method must be one of"),
    ({"target_modules": ["q"], "budget": 10, "qr_method": "randomized"}, ValueError, "budget needs qr_method='geqp3'"),
    ({"target_modules": ["q"], "store_r": "no"}, TypeError, "store_r must be a bool"),
    # Regexes are compiled here: apply_qrlora used to raise re.error (no ValueError) without naming the field.
    ({"target_modules": "(("}, ValueError, r"target_modules is not a valid regular expression: '\(\(' \(missing \)"),
    ({"target_modules": r"layer\.[0-9.*query"}, ValueError, "target_modules is not a valid regular expression"),
    ({"target_modules": ["q"], "exclude_modules": "(("}, ValueError, "exclude_modules is not a valid regular expression"),
    # The field and the bad element are named (they were "'int' object is not iterable" and a failed sort).
    ({"target_modules": ["q"], "layers_pattern": 5}, TypeError, "layers_pattern must be a container name .* got int 5"),
    ({"target_modules": ["q"], "layers_pattern": ["h", 5]}, TypeError, r"layers_pattern must contain .* got \[5\]"),
    ({"target_modules": {"query", 3}}, TypeError, r"target_modules must contain non-empty module names \(str\), got \[3\]"),
    ({"target_modules": ["q"], "exclude_modules": {"k", None}}, TypeError, r"exclude_modules must contain .* \[None\]"),
])
def test_config_rejects_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        QRLoraConfig(**kwargs)


def test_config_names_are_not_read_as_regexes():
    """Only target_modules and exclude_modules take a regex: a modules_to_save name or a layers_pattern container
    is matched literally, so a character special to regexes in one is no error."""
    cfg = QRLoraConfig(target_modules=["q"], modules_to_save="head(", layers_pattern={"h(", "blocks"})
    assert cfg.modules_to_save == ["head("] and cfg.layers_pattern == ["blocks", "h("]
    assert cfg.layer_index("model.h(.3.q") == 3


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown QRLoraConfig fields: \\['r'\\]"):
        QRLoraConfig.from_dict({"target_modules": ["q"], "r": 8})


# ------------------------------------------------------------------------------------------ selection
def test_config_takes_peft_names_and_explains_lora_only_fields():
    """A PEFT LoraConfig recipe carries over: PEFT's names where they mean the same, a helpful error where not."""
    cfg = QRLoraConfig(target_modules=["query"], layers_to_transform=[2, 0], task_type="SEQ_CLS")
    assert cfg.layers == [0, 2] and cfg.task_type == "SEQ_CLS"
    assert QRLoraConfig.from_dict(cfg.to_dict()) == cfg
    peft = pytest.importorskip("peft")
    assert QRLoraConfig(target_modules=["q"], task_type=peft.TaskType.SEQ_CLS).task_type == "SEQ_CLS"
    with pytest.raises(TypeError, match="no LoRA field 'r' .*tau.*rank.*budget.*'lora_alpha' .*no scaling"):
        QRLoraConfig(target_modules=["q"], r=8, lora_alpha=16)
    # bias="none" is PEFT's default and QR-LoRA's behaviour: a ported recipe keeps it; anything else is refused.
    assert QRLoraConfig(target_modules=["q"], bias="none") == QRLoraConfig(target_modules=["q"])
    assert dataclasses.replace(cfg, bias="none") == cfg
    with pytest.raises(TypeError, match="no LoRA field 'bias' .*frozen.*modules_to_save"):
        QRLoraConfig(target_modules=["q"], bias="lora_only")
    with pytest.raises(TypeError, match="'rank_pattern' .*budget=.*'inference_mode' .*merge_and_unload"):
        QRLoraConfig(target_modules=["q"], rank_pattern={"q": 4}, inference_mode=True)
    assert dataclasses.replace(cfg, layers_to_transform=[1]).layers == [1]
    assert dataclasses.replace(cfg, tau=0.5).layers == [0, 2]
    assert QRLoraConfig.from_dict({"target_modules": ["q"], "layers_to_transform": 3}).layers == [3]
    assert "task_type" not in QRLoraConfig(target_modules=["q"]).to_dict()  # files stay readable by 0.1.0
    with pytest.raises(ValueError, match="task_type must be one of"):
        QRLoraConfig(target_modules=["q"], task_type="SEQ_CLASSIFICATION")
    with pytest.raises(TypeError, match="unexpected keyword argument 'rnak'"):
        QRLoraConfig(target_modules=["q"], rnak=4)


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, 4, batch_first=True)
        self.ffn = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h):
        return self.ffn(self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_out_proj_is_never_adapted_silently():
    """MHA reads out_proj.weight directly: an adapter there would never train."""
    model = MHABlock()
    assert _names(model, QRLoraConfig(target_modules="all-linear")) == ["ffn"]
    with pytest.raises(ValueError, match="attn.out_proj is the out_proj of an nn.MultiheadAttention"):
        find_targets(model, QRLoraConfig(target_modules=["out_proj", "ffn"]))
    assert _names(model, QRLoraConfig(target_modules=["out_proj", "ffn"], exclude_modules=["out_proj"])) == ["ffn"]


def test_no_match_names_modules_that_match_but_are_not_linear():
    model = nn.Sequential(nn.Embedding(10, HIDDEN), nn.Linear(HIDDEN, HIDDEN))
    with pytest.raises(ValueError, match=r"matched by name but not nn.Linear: \['0'\] \(Embedding\).*linear modules "
                                         r"include \['1'\]"):
        apply_qrlora(model, QRLoraConfig(target_modules=["0"]), progress=False)


def test_task_type_trains_the_fresh_head_and_a_frozen_one_is_warned_about():
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=20, num_labels=3)
    torch.manual_seed(0)
    base = transformers.RobertaForSequenceClassification(config)
    model = copy.deepcopy(base)
    report = apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], rank=2, task_type="SEQ_CLS"),
                          progress=False)
    assert report.modules_to_save == ["classifier"]
    assert all(p.requires_grad for p in model.classifier.parameters())
    frozen = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="head 'classifier' is frozen.*modules_to_save=\\['classifier'\\]"):
        apply_qrlora(frozen, QRLoraConfig(target_modules=["query", "value"], rank=2), progress=False)
    # Targeting the head adapts it, but its random weights stay frozen: only lam train on their basis.
    with pytest.warns(UserWarning, match="head 'classifier' is frozen \\(target_modules adapted it: only its lam "
                                         "train.*modules_to_save=\\['classifier'\\]"):
        apply_qrlora(copy.deepcopy(base), QRLoraConfig(target_modules=["query", "dense"], rank=2), progress=False)
    # An image classifier's head starts random too (ViT's classifier); modules_to_save trains it, quietly.
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
        patch_size=8, num_labels=3))
    with pytest.warns(UserWarning, match="ViTForImageClassification's head 'classifier' is frozen"):
        apply_qrlora(copy.deepcopy(vit), QRLoraConfig(target_modules="all-linear", rank=2), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_qrlora(vit, QRLoraConfig(target_modules="all-linear", rank=2, modules_to_save=["classifier"]),
                     progress=False)
    # A task type whose head the model lacks adds nothing and does not fail (PEFT's names are only candidates).
    plain = nn.Sequential(nn.Linear(HIDDEN, HIDDEN))
    assert apply_qrlora(plain, QRLoraConfig(target_modules=["0"], rank=2, task_type="SEQ_CLS"),
                        progress=False).modules_to_save == []


def test_an_encoder_decoder_classification_head_is_trained_by_task_type_and_left_alone_by_all_linear():
    """BART's (and T5's) fresh head is a module called classification_head, with linears inside."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BartForSequenceClassification(config)
    model = copy.deepcopy(base)
    report = apply_qrlora(model, QRLoraConfig(target_modules="all-linear", rank=2, task_type="SEQ_CLS"),
                          progress=False)
    assert report.modules_to_save == ["classification_head"]
    assert not [m.name for m in report.modules if m.name.startswith("classification_head")]
    assert {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("lam")} == {
        f"classification_head.{n}" for n, _ in base.classification_head.named_parameters()}
    with pytest.warns(UserWarning, match="head 'classification_head' is frozen.*"
                                         "modules_to_save=\\['classification_head'\\]"):
        apply_qrlora(copy.deepcopy(base), QRLoraConfig(target_modules=["q_proj", "v_proj"], rank=2), progress=False)


@pytest.mark.parametrize("rule", [dict(tau=0.9), dict(rank=3), dict(budget=40)], ids=["tau", "rank", "budget"])
def test_a_zero_weight_stays_linear_instead_of_failing_the_conversion(rule):
    base, model = _pair(2)
    with torch.no_grad():
        base.layers[1].value.weight.zero_()
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="1 targeted weight\\(s\\) are all zeros .*: layers.1.value"):
        report = apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], **rule), progress=False)
    assert "layers.1.value" in report.skipped and type(model.layers[1].value) is nn.Linear
    assert {m.name for m in report.modules} >= {"layers.0.query", "layers.0.value", "layers.1.query"} - set(
        report.skipped)
    x = torch.randn(2, 3, 8)
    assert_rel_close(model(x), base(x), 1e-6, name="converted model at lam=0")
    with torch.no_grad():
        base.layers[0].value.weight.zero_()
    with pytest.raises(ValueError, match="every targeted weight is all zeros"):
        apply_qrlora(copy.deepcopy(base), QRLoraConfig(target_modules=["value"], **rule), progress=False)


def test_disable_adapters_gives_the_base_model_inside_the_block():
    base, model = _pair(2)
    apply_qrlora(model, QRLoraConfig(target_modules=["query", "value", "up"]), progress=False)
    with torch.no_grad():
        for _, layer in qrlora_layers(model):
            layer.lam.normal_()
    x = torch.randn(2, 4, 8)
    adapted = model(x)
    assert rel_error(adapted, base(x)) > 1e-3
    with disable_adapters(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), adapted)  # back on after the block
    model.layers[0].query.merge()
    with pytest.raises(ValueError, match="layers.0.query: layer is merged"):
        with disable_adapters(model):
            pass
    # modules_to_save compute with the base values kept for them (tests/test_modules_to_save.py).
    with_head = copy.deepcopy(base)
    apply_qrlora(with_head, QRLoraConfig(target_modules=["query"], modules_to_save=["classifier"]), progress=False)
    with torch.no_grad():
        with_head.classifier[0].weight.add_(1.0)
        assert rel_error(with_head(x), base(x)) > 1e-3
        with disable_adapters(with_head):
            assert torch.equal(with_head(x), base(x))


def test_target_selection_suffix_regex_all_linear_exclude_layers():
    model = TinyModel()
    assert _names(model, QRLoraConfig(target_modules=["query"])) == [f"layers.{i}.query" for i in range(3)]
    # Regex: full-name match, like PEFT.
    assert _names(model, QRLoraConfig(target_modules=r"layers\.1\.(query|up)")) == ["layers.1.query", "layers.1.up"]
    assert _names(model, QRLoraConfig(target_modules="query")) == []  # a regex string must match the full name
    everything = _names(model, QRLoraConfig(target_modules="all-linear"))
    assert "embed" in everything and "layers.2.down" in everything
    assert not any(n.startswith(("lm_head", "classifier")) for n in everything)  # output heads excluded
    assert _names(model, QRLoraConfig(target_modules="all-linear", exclude_modules=["up", "down", "embed"],
                                      layers=[0, 2])) == [
        "layers.0.query", "layers.0.value", "layers.2.query", "layers.2.value"]
    # A module trained in full is not also adapted.
    assert "classifier.0" not in _names(model, QRLoraConfig(target_modules=["0"], modules_to_save=["classifier"]))


def test_layer_index_patterns():
    cfg = QRLoraConfig(target_modules=["q"])
    assert cfg.layer_index("encoder.layer.11.attention.self.query") == 11
    assert cfg.layer_index("model.layers.3.self_attn.q_proj") == 3
    assert cfg.layer_index("transformer.h.7.attn.c_attn") == 7
    assert cfg.layer_index("pooler.dense") is None
    assert QRLoraConfig(target_modules=["q"], layers_pattern="blk").layer_index("blk.4.q") == 4


# ------------------------------------------------------------------------------------------ apply
def test_apply_keeps_outputs_freezes_and_reports():
    base, model = _pair()
    x = torch.randn(4, 5, 8)
    report = apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]),
                          progress=False)
    assert [m.name for m in report.modules] == [f"layers.{i}.{p}" for i in range(3) for p in ("query", "value")]
    for name, layer in qrlora_layers(model):
        assert isinstance(layer, QRLoraLinear)
        entry = next(m for m in report.modules if m.name == name)
        assert entry.rank == layer.rank == layer.lam.numel() == entry.params
        assert entry.shape == (HIDDEN, HIDDEN) and 0.9 <= entry.energy_captured <= 1.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m.name}.lam" for m in report.modules} | {
        f"classifier.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    assert report.adapter_params == sum(m.rank for m in report.modules)
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.trainable_percent == pytest.approx(100 * report.trainable_params / report.total_params)
    text = str(report)
    assert "layers.2.value" in text and "trainable%" in text and "modules_to_save: classifier" in text
    # lam = 0: the converted model is the original model.
    assert_rel_close(model(x), base(x), 1e-6, name="converted output")
    assert model.qrlora_adapter_ids == {"default": 0}


def test_the_report_is_not_a_model_and_says_so():
    """PEFT's habit, model = get_peft_model(model, config), written as model = apply_qrlora(model, config), gives
    Trainer or a training loop the report: the error says that the model was converted in place."""
    _, model = _pair()
    report = apply_qrlora(model, QRLoraConfig(target_modules=["query"], rank=2), progress=False)
    for use in (lambda r: r.to("cpu"), lambda r: r.parameters(), lambda r: r.train()):
        with pytest.raises(AttributeError, match="'QRLoraReport' object has no attribute '(to|parameters|train)': "
                                                 "apply_qrlora converts the model in place .* not a model"):
            use(report)
    assert not hasattr(report, "to")
    with pytest.raises(TypeError, match="QRLoraReport is not callable: apply_qrlora converts the model in place"):
        report(torch.randn(2, 8))
    # Copies and pickles as a plain dataclass (their protocol lookups of missing dunders are not redirected).
    import pickle
    assert copy.deepcopy(report) == report == pickle.loads(pickle.dumps(report))
    assert report.modules[0].rank == 2 and str(report) == str(copy.copy(report))


@pytest.mark.parametrize("rule", [dict(tau=0.9), dict(budget=40)], ids=["tau", "budget"])
def test_store_r_false_halves_the_basis_and_keeps_the_model(rule, monkeypatch):
    """QRLoraConfig(store_r=False): the same layers, ranks and (to rounding) outputs and gradients, with Q alone
    held, also while converting (no R reaches the layers: each was dropped once its energy was known); the
    report says what the bases cost in memory."""
    import qrlora_kernels.model as qm
    base, full = _pair()
    half = copy.deepcopy(base)
    config = QRLoraConfig(target_modules="all-linear", **rule)
    full_report = apply_qrlora(full, config, progress=False)
    seen = []
    make_layer = qm._make_layer
    monkeypatch.setattr(qm, "_make_layer", lambda linear, basis, *a, **k: seen.append(basis.R is None) or
                        make_layer(linear, basis, *a, **k))
    half_report = apply_qrlora(half, dataclasses.replace(config, store_r=False), progress=False)
    assert seen and all(seen), "a basis still held R during the conversion"
    assert [(m.name, m.rank) for m in half_report.modules] == [(m.name, m.rank) for m in full_report.modules]
    layers = dict(qrlora_layers(half))
    assert layers and all(layer.R is None and not layer.store_r for layer in layers.values())
    q_values = sum(layer.Q.numel() for layer in layers.values())
    r_values = sum(layer.R.numel() for _, layer in qrlora_layers(full))
    assert half_report.basis_values == q_values and full_report.basis_values == q_values + r_values
    share = 100 * q_values / half_report.total_params
    assert f"basis buffers: {q_values:,} values (+{share:.1f}% of all params in memory)" in str(half_report)
    gen = torch.Generator().manual_seed(3)
    for name, layer in qrlora_layers(full):
        with torch.no_grad():
            layer.lam.copy_(torch.randn(layer.lam.shape, generator=gen) * 0.3)
            layers[name].lam.copy_(layer.lam)
    x = torch.randn(4, 5, 8)
    y_full, y_half = full(x), half(x)
    assert_rel_close(y_half, y_full.double(), 1e-5, name="outputs")
    y_full.square().sum().backward()
    y_half.square().sum().backward()
    for name, layer in qrlora_layers(full):
        assert_rel_close(layers[name].lam.grad, layer.lam.grad.double(), 1e-5, name=f"{name} dlam")
    merged = merge_and_unload(half)
    assert not qrlora_layers(merged)
    assert_rel_close(merged(x), y_full.double(), 1e-5, name="merged outputs")


def test_apply_rank_and_frobenius_rules_reach_layers():
    _, model = _pair(2)
    report = apply_qrlora(model, QRLoraConfig(target_modules=["up"], rank=100), progress=False)
    assert [m.rank for m in report.modules] == [HIDDEN, HIDDEN]  # capped at min(in, out)
    _, model = _pair(2)
    report = apply_qrlora(model, QRLoraConfig(target_modules=["down"], tau=0.5, energy="frobenius"), progress=False)
    for m in report.modules:
        assert 0.5 <= m.energy_captured < 1.0
        assert model.get_submodule(m.name).energy == "frobenius"


@pytest.mark.parametrize("rule", [{"tau": 0.9}, {"tau": 0.8, "energy": "frobenius"}, {"rank": 6}])
def test_randomized_pivoting_converts_like_geqp3(rule):
    """qr_method="randomized": other pivots, but the same rule gives about the same energy, the converted model
    starts equal to the original, and converting the same model again gives the same bases (fixed seed)."""
    base, model = _pair(2)
    config = QRLoraConfig(target_modules="all-linear", qr_method="randomized", **rule)
    report = apply_qrlora(model, config, progress=False)
    again, paper = copy.deepcopy(base), copy.deepcopy(base)
    apply_qrlora(again, config, progress=False)
    reference = apply_qrlora(paper, QRLoraConfig(target_modules="all-linear", **rule), progress=False)
    x = torch.randn(3, 5, 8)
    assert_rel_close(model(x), base(x), 1e-6, name="converted output")
    assert len(report.modules) == len(reference.modules) > 0
    for got, ref in zip(report.modules, reference.modules):
        # Random (flat-spectrum) weights: the two pivotings' diagonals differ most here.
        assert got.name == ref.name and abs(got.energy_captured - ref.energy_captured) < 0.1, (got, ref)
        layer = model.get_submodule(got.name)
        assert torch.equal(layer.Q, again.get_submodule(got.name).Q), f"{got.name}: not reproducible"
        assert_rel_close(layer.Q.double().t() @ layer.Q.double(), torch.eye(layer.rank, dtype=torch.float64),
                         1e-5, name=f"{got.name} Q^T Q")


def test_apply_errors():
    model = TinyModel()
    with pytest.raises(ValueError, match=r"no nn.Linear module matched target_modules=\['attention'\]"):
        apply_qrlora(model, QRLoraConfig(target_modules=["attention"]))
    with pytest.raises(ValueError, match="modules_to_save=\\['head'\\] matched no module"):
        apply_qrlora(model, QRLoraConfig(target_modules=["query"], modules_to_save=["head"]))
    with pytest.raises(TypeError, match="config must be a QRLoraConfig"):
        apply_qrlora(model, {"target_modules": ["query"]})
    apply_qrlora(model, QRLoraConfig(target_modules=["query"]), progress=False)
    with pytest.raises(ValueError, match="already has QR-LoRA layers"):
        apply_qrlora(model, QRLoraConfig(target_modules=["value"]))
    with pytest.raises(ValueError, match=r"budget=100000 exceeds the"):
        apply_qrlora(TinyModel(), QRLoraConfig(target_modules=["query"], budget=100_000))


def _independent_budget_counts(weights, budget):
    """The budget rule from its definition, with scipy's pivoted QR in float64."""
    energies = []
    for w in weights:
        _, r, _ = scipy.linalg.qr(w.double().numpy(), pivoting=True, mode="economic")
        d = np.diag(r) ** 2
        energies.append(d / d.sum())
    flat = np.concatenate(energies)
    owner = np.concatenate([np.full(e.size, i) for i, e in enumerate(energies)])
    winners = owner[np.argsort(-flat, kind="stable")[:budget]]
    return [int((winners == i).sum()) for i in range(len(weights))]


@pytest.mark.parametrize("budget", [7, 61])
def test_global_budget_is_exact_and_follows_the_energies(budget):
    base, model = _pair()
    config = QRLoraConfig(target_modules="all-linear", budget=budget)
    targets = find_targets(base, config)
    expected = _independent_budget_counts([lin.weight.detach() for _, lin in targets], budget)
    report = apply_qrlora(model, config, progress=False)
    got = {m.name: m.rank for m in report.modules}
    assert [got.get(n, 0) for n, _ in targets] == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == budget == report.adapter_params
    # Modules given no component stay plain nn.Linear, and are reported.
    for (name, _), count in zip(targets, expected):
        assert isinstance(model.get_submodule(name), QRLoraLinear) == (count > 0)
    assert report.skipped == [n for (n, _), c in zip(targets, expected) if c == 0]
    x = torch.randn(2, 3, 8)
    assert_rel_close(model(x), base(x), 1e-6, name="budget model at lam=0")


# ------------------------------------------------------------------------------------------ training, merging
def test_training_changes_only_lam_and_merge_and_unload_keeps_outputs():
    base, model = _pair(2)
    apply_qrlora(model, QRLoraConfig(target_modules=["query", "value", "up"]), progress=False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".lam")}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, target = torch.randn(8, 4, 8), torch.randn(8, 13)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        if not k.endswith(".lam"):
            assert torch.equal(v, frozen[k]), k
    adapted = model(x).detach()
    assert rel_error(adapted, base(x)) > 1e-4
    merge_and_unload(model)
    assert not qrlora_layers(model) and not hasattr(model, "qrlora_adapter_ids")
    assert all(type(model.get_submodule(f"layers.{i}.{p}")) is nn.Linear for i in range(2) for p in ("query", "up"))
    assert_rel_close(model(x), adapted, 1e-5, name="merged output")
    assert not [n for n, p in model.named_parameters() if p.requires_grad]  # the merged layers stay frozen
    with pytest.raises(ValueError, match="no QR-LoRA layers to merge"):
        merge_and_unload(model)


def _three_adapter_model(num_layers=2):
    _, model = _pair(num_layers)
    apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"]), progress=False)
    for _, layer in qrlora_layers(model):
        layer.set_num_adapters(3)
        with torch.no_grad():
            layer.lam.normal_()
    model.qrlora_adapter_ids = {"a": 0, "b": 1, "c": 2}
    return model


def _assert_each_sequence_alone(model, x, mixed, rows):
    """Sequence i of a mixed-adapter output ``mixed`` equals the model run on it alone with adapter ``rows[i]``."""
    for i, row in enumerate(rows):
        for _, layer in qrlora_layers(model):
            layer.active_adapter = row
        assert_rel_close(mixed[i:i + 1], model(x[i:i + 1]), 1e-5, name=f"sequence {i}")


def _keep_id_ranges_as_on_cuda(monkeypatch):
    """Ranges (and the ids stretched from them) are kept for CUDA ids only: CPU ids are measured and stretched
    every time, as writes through .data or numpy, which leave the version counter alone, are common there."""
    from qrlora_kernels import functional
    monkeypatch.setattr(functional, "id_range_kept", lambda t: not t.is_inference())


def test_adapter_batch_routes_ids_and_validates():
    model = _three_adapter_model()
    x = torch.randn(4, 5, 8)
    with adapter_batch(model, ["c", "a", 1, "c"]):
        mixed = model(x)
    _assert_each_sequence_alone(model, x, mixed, [2, 0, 1, 2])
    assert all(layer.adapter_ids is None for _, layer in qrlora_layers(model))  # ids removed after the block
    # Serving runs under inference_mode: the ids stay ordinary tensors (an inference tensor has no version
    # counter, so every layer would read its range back from the device).
    with torch.inference_mode(), adapter_batch(model, ["c", "a", 1, "c"]):
        assert_rel_close(model(x), mixed, 0.0, name="inference_mode")
        assert not any(layer.adapter_ids.is_inference() for _, layer in qrlora_layers(model))
    # A batch that is a multiple of the ids is not taken for beams unless the top-level call's input_ids say
    # so: a sequence-first layout (seq, batch, hidden) must stay an error, not a silent misrouting.
    with pytest.raises(ValueError, match="adapter_ids has shape \\(2,\\)"):
        with adapter_batch(model, ["a", "b"]):
            model(torch.randn(4, 5, 8))
    with pytest.raises(ValueError, match="unknown adapter 'z'"):
        with adapter_batch(model, ["a", "z"]):
            pass
    with pytest.raises(ValueError, match="adapter id out of range"):
        with adapter_batch(model, [0, 3]):
            pass
    with pytest.raises(TypeError, match="integer tensor"):
        with adapter_batch(model, torch.tensor([0.0, 1.0])):
            pass
    # No name: the adapter the layers compute with (here "c", set on every layer); layers that disagree: refused.
    assert_rel_close(merge_and_unload(copy.deepcopy(model))(x), model(x), 1e-5, name="merged without a name")
    model.layers[0].query.active_adapter = 0
    with pytest.raises(ValueError, match=r"compute with different adapters \(rows \[0, 2\] of \['a', 'b', 'c'\]\): "
                                         r"pass adapter_name="):
        merge_and_unload(copy.deepcopy(model))
    merged = merge_and_unload(copy.deepcopy(model), adapter_name="b")
    # Layers given their adapters by hand (no adapter names): each would merge a row of its own choosing.
    by_hand = copy.deepcopy(model)
    del by_hand.qrlora_adapter_ids
    with pytest.raises(ValueError, match="layer has 3 adapters: pass adapter_name"):
        merge_and_unload(by_hand)
    for _, layer in qrlora_layers(model):
        layer.active_adapter = 1
    assert_rel_close(merged(x), model(x), 1e-5, name="merged adapter b")


def test_adapter_batch_reads_the_ids_back_once(monkeypatch):
    """Each read of the ids' values is a host sync on a GPU. adapter_batch read min and max (two syncs), then the
    first layer read both again; now one read, whose range every layer reuses (on the CPU ranges are not kept,
    so this test keeps them as on CUDA)."""
    model = _three_adapter_model()
    x = torch.randn(4, 5, 8)
    _keep_id_ranges_as_on_cuda(monkeypatch)
    reads = []
    for name in ("tolist", "item", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
    with adapter_batch(model, ["c", "a", 1, "c"]) as ids:
        mixed = model(x)
        ids_reads = list(reads)
        ids.add_(0)  # an in-place write (the version counter moves): the range is read again, once
        model(x)
    monkeypatch.undo()
    assert ids_reads == ["tolist"] and reads == ["tolist", "tolist"], reads
    _assert_each_sequence_alone(model, x, mixed, [2, 0, 1, 2])


def _refuse_repeat_interleave(monkeypatch):
    """repeat_interleave with an int count reads its repeats back from the device on some torch releases (a host
    sync): ids are stretched with expand instead."""
    def refused(*args, **kwargs):
        raise AssertionError("repeat_interleave called")
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refused)
    monkeypatch.setattr(torch, "repeat_interleave", refused)


def test_adapter_batch_makes_the_per_token_ids_once_per_forward(monkeypatch):
    """Every layer expanded the per-sequence ids to one per token (a small kernel per layer per forward); now the
    first layer of each input shape does, for all of them. A write into the ids makes them again. CPU ids are
    expanded every time, also when written through .data."""
    model = _three_adapter_model(num_layers=3)
    x = torch.randn(4, 5, 8)
    _keep_id_ranges_as_on_cuda(monkeypatch)
    made = []
    original = QRLoraLinear._derived_ids
    monkeypatch.setattr(QRLoraLinear, "_derived_ids", staticmethod(lambda *a: made.append(1) or original(*a)))
    _refuse_repeat_interleave(monkeypatch)
    with adapter_batch(model, ["c", "a", 1, "c"]) as ids:
        mixed = model(x)
        assert len(made) == 1
        model(x[:, :3])  # another sequence length: made once more
        assert len(made) == 2
        ids[1] = 2  # in place: the next forward must not reuse the expansion of the old ids
        changed = model(x)
    monkeypatch.undo()
    assert len(made) == 3
    with adapter_batch(model, ["c", "a", 1, "c"]) as ids:
        model(x)
        ids.data[1] = 2  # no version bump: on the CPU the ids are read again all the same
        assert_rel_close(model(x), changed, 0.0, name="after a write through .data")
        ids.data[1] = 7
        with pytest.raises(ValueError, match="adapter id 7 is out of range for 3 adapter"):
            model(x)
    _assert_each_sequence_alone(model, x, mixed, [2, 0, 1, 2])
    for _, layer in qrlora_layers(model):
        layer.active_adapter = 2
    assert_rel_close(changed[1:2], model(x[1:2]), 1e-5, name="sequence 1 after its id changed to 'c'")


@pytest.mark.gpu
def test_adapter_batch_on_cuda_does_not_sync_in_the_layers():
    """The block measures the ids once as it starts (its copy to the GPU syncs too); the first forward in a new
    block then reads nothing back (each layer's first look at a new ids tensor read min and max)."""
    model = _three_adapter_model().cuda()
    x = torch.randn(4, 5, 8, device="cuda")
    with adapter_batch(model, ["c", "a", 1, "c"]):
        model(x)  # warm-up: kernels compiled, strategy tables filled
    for ids in (["c", "a", 1, "c"], torch.tensor([2, 0, 1, 2], device="cuda")):
        with adapter_batch(model, ids):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")


class CheckpointedModel(nn.Module):
    """Blocks run under torch.utils.checkpoint (reentrant), even in eval mode, as some training loops do."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.use_reentrant = True

    def forward(self, h):
        for block in self.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.use_reentrant)
        return h


def _checkpointed_two_adapter_model(use_reentrant=True):
    """A CheckpointedModel (eval mode: dropout off, still checkpointed) with adapters "a" and "b" (random lam)."""
    model = CheckpointedModel().eval()
    model.use_reentrant = use_reentrant
    apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], rank=4), progress=False)
    for _, layer in qrlora_layers(model):
        layer.set_num_adapters(2)
        with torch.no_grad():
            layer.lam.normal_()
    model.qrlora_adapter_ids = {"a": 0, "b": 1}
    return model


def _backward_after_the_block_raises(model, run, x):
    """Backward inside an adapter_batch block is exact; one after the block that set up the forward raises."""
    with adapter_batch(model, ["a", "b"]):
        run(x).square().sum().backward()
    with torch.no_grad():
        run(x)  # a forward outside any block clears what the backward's recomputations inside the block marked
    with adapter_batch(model, ["a", "b"]):
        loss = run(x).square().sum()
    with pytest.raises(RuntimeError, match="recomputed during backward"):
        loss.backward()


def test_a_recomputation_after_the_block_raises_instead_of_giving_wrong_gradients():
    torch.manual_seed(0)
    model = _checkpointed_two_adapter_model()
    x = torch.randn(2, 3, HIDDEN, requires_grad=True)
    _backward_after_the_block_raises(model, model, x)
    with disable_adapters(model):
        loss = model(x).square().sum()
    with pytest.raises(RuntimeError, match="adapter_batch / disable_adapters block"):
        loss.backward()
    model(x).square().sum().backward()  # a plain checkpointed step afterwards is not refused


class _ForeignCheckpoint(torch.autograd.Function):
    """A reentrant checkpoint that is not torch's (DeepSpeed's and fairscale's are built this way): forward under
    no_grad, the function run again in backward."""

    @staticmethod
    def forward(ctx, run_function, h):
        ctx.run_function = run_function
        ctx.save_for_backward(h)
        with torch.no_grad():
            return run_function(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.backward(ctx.run_function(h), grad)
        return None, h.grad


@pytest.mark.parametrize("wrap", ["nested", "foreign"])
def test_a_recomputation_after_the_block_raises_for_nested_and_foreign_checkpoints(wrap):
    """The forward of a checkpoint nested in a recorded one runs under an unrecorded inner Function, and another
    library's checkpoint is not torch's CheckpointFunction: either way the layer is marked, and a backward
    after the block raises instead of giving the other adapter's rows zero gradients."""
    torch.manual_seed(0)
    model = _checkpointed_two_adapter_model()
    checkpoint = torch.utils.checkpoint.checkpoint
    if wrap == "nested":
        def run(h):
            return checkpoint(lambda t: checkpoint(model, t, use_reentrant=True), h, use_reentrant=True)
    else:
        # The blocks' own (non-reentrant) checkpoints do nothing under the foreign forward's no_grad; they act in
        # its backward's recomputation, where the layer raises. torch 2.6-2.11 then leave that checkpoint's
        # generator open, and its cleanup reports an INTERNAL ASSERT (SavedTensorHooks.cpp) as an unraisable
        # exception: torch's, after our error; torch 2.14 does not.
        model.use_reentrant = False
        def run(h):
            return _ForeignCheckpoint.apply(model, h)
    x = torch.randn(2, 3, HIDDEN, requires_grad=True)
    _backward_after_the_block_raises(model, run, x)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("order", ["reference-first", "policy-first"])
def test_a_no_grad_reference_pass_in_a_block_leaves_a_checkpointed_backward_alone(use_reentrant, order):
    """DPO / KL-to-base: the policy's forward outside any block, the reference's under no_grad inside
    disable_adapters (or adapter_batch), then backward. The reference records no graph, so nothing of it is
    recomputed: the backward runs and gives the gradients of a step without the reference pass."""
    torch.manual_seed(0)
    model = _checkpointed_two_adapter_model(use_reentrant)
    x = torch.randn(2, 3, HIDDEN, requires_grad=True)
    lams = [layer.lam for _, layer in qrlora_layers(model)]

    def lam_grads(loss):  # backward(), not autograd.grad: reentrant checkpointing supports only the former
        for lam in lams:
            lam.grad = None
        loss.backward()
        return [lam.grad for lam in lams]
    expected = lam_grads(model(x).square().sum())
    for block in (lambda: disable_adapters(model), lambda: adapter_batch(model, ["b", "a"])):
        if order == "reference-first":
            with torch.no_grad(), block():
                reference = model(x)
            loss = model(x).square().sum()
        else:
            loss = model(x).square().sum()
            with torch.no_grad(), block():
                reference = model(x)
        assert not reference.requires_grad
        for g, e in zip(lam_grads(loss), expected):
            assert_rel_close(g, e, 1e-6, name=f"lam grad ({order}, reentrant={use_reentrant})")


def test_an_embedding_model_called_sequence_first_is_not_taken_for_beams():
    """(seq, batch) input_ids whose seq is a multiple of the ids: outside generate() that is an error."""
    model = nn.Sequential(nn.Embedding(20, HIDDEN), nn.Linear(HIDDEN, HIDDEN))
    apply_qrlora(model, QRLoraConfig(target_modules=["1"], rank=4), progress=False)
    model[1].set_num_adapters(2)
    model.qrlora_adapter_ids = {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="adapter_ids has shape \\(2,\\)"):
        with adapter_batch(model, ["a", "b"]):
            model(torch.randint(0, 20, (6, 2)))


def test_a_quantised_linear_is_named_with_what_to_do(tmp_path):
    from qrlora_kernels import load_adapter, save_adapter
    from qrlora_kernels.basis import build_basis
    class Linear8bitLt(nn.Linear):  # the shape of bitsandbytes' int8 layer: an nn.Linear holding an integer weight
        pass
    model = nn.Sequential(nn.Linear(8, 8), Linear8bitLt(8, 8))
    model[1].weight = nn.Parameter(torch.randint(-100, 100, (8, 8), dtype=torch.int8), requires_grad=False)
    message = (r"^1: its weight is torch.int8 of shape \(8, 8\), a quantised layer \(Linear8bitLt\); QR-LoRA "
               r"factorises the weight itself: load the base model unquantised")
    with pytest.raises(TypeError, match=message):
        apply_qrlora(model, QRLoraConfig(target_modules="all-linear", rank=2), progress=False)
    assert type(model[0]) is nn.Linear  # nothing converted
    plain = nn.Sequential(copy.deepcopy(model[0]), nn.Linear(8, 8))  # the float model it was quantised from
    apply_qrlora(plain, QRLoraConfig(target_modules="all-linear", rank=2), progress=False)
    save_adapter(plain, tmp_path)
    with pytest.raises(TypeError, match=message):  # and loading onto it (4-bit ones are packed: any shape)
        load_adapter(model, tmp_path)
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor, got dtype torch.int8 \(QR-LoRA "
                                        r"factorises the weight itself: a quantised layer"):
        build_basis(model[1].weight, rank=2)  # the basis on its own says it too


def test_a_weight_not_loaded_is_named_with_what_to_do(tmp_path):
    """Weights on the meta device (init_empty_weights, an offloading device_map) have nothing to factorise or
    fingerprint: apply_qrlora and load_adapter say so, naming the module, and change nothing."""
    from qrlora_kernels import load_adapter, save_adapter
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    adapted = copy.deepcopy(model)
    apply_qrlora(adapted, QRLoraConfig(target_modules="all-linear", rank=2), progress=False)
    save_adapter(adapted, tmp_path)
    model[1].to("meta")
    message = r"^1: its weight is on the meta device, not loaded .* load the weights onto a device first"
    with pytest.raises(ValueError, match=message):
        apply_qrlora(model, QRLoraConfig(target_modules="all-linear", rank=2), progress=False)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad  # nothing converted or frozen


def test_progress_bar_over_modules(capsys):
    _, model = _pair(1)
    apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"]), progress=True)
    err = capsys.readouterr().err
    assert "QR-LoRA factorisation" in err and "/2 [" in err  # a bar over the 2 targeted modules


@pytest.mark.gpu
def test_apply_factorises_on_the_model_device():
    base = TinyModel().eval().cuda()
    model = copy.deepcopy(base)
    report = apply_qrlora(model, QRLoraConfig(target_modules="all-linear", budget=40), progress=False)
    assert report.adapter_params == 40
    for _, layer in qrlora_layers(model):
        assert layer.Q.is_cuda and layer.R.is_cuda and layer.lam.is_cuda
    x = torch.randn(2, 3, 8, device="cuda")
    assert_rel_close(model(x), base(x), 5e-4, name="converted output on cuda (tf32 band)")
