"""modules_to_save per adapter: every adapter computes, trains, saves and merges with its own copy of the
modules it trains in full, and the base model's values are kept for the others and for disable_adapters.

Most checks compare a model serving several adapters with each adapter loaded alone into a fresh base model; the
others check refusals, and that a refusal leaves the model as it was."""
import copy
import pickle

import pytest
import torch
from torch import nn

from qrlora_kernels import (QRLoraConfig, apply_qrlora, delete_adapter, disable_adapters, load_adapter,
                            merge_and_unload, save_adapter, set_adapter, unload)
from qrlora_kernels.model import adapter_batch, qrlora_layers
from qrlora_kernels.testing import assert_rel_close, rel_error

from test_adapter_io import CONFIG, HIDDEN, TinyModel, _adapted

NO_HEAD = QRLoraConfig(target_modules=["query", "value"])


@pytest.fixture
def base():
    return TinyModel().eval()


@pytest.fixture
def folders(base, tmp_path):
    """Three saved adapters of ``base``: "a" and "b" with their own trained classifier, "plain" without one."""
    torch.manual_seed(1)
    for name, config in (("a", CONFIG), ("b", CONFIG), ("plain", NO_HEAD)):
        save_adapter(_adapted(base, config), tmp_path / name)
    return tmp_path


def _alone(base, folder):
    model = copy.deepcopy(base)
    load_adapter(model, folder)
    return model


def _served(base, folders, names=("a", "b", "plain")):
    model = copy.deepcopy(base)
    for name in names:
        load_adapter(model, folders / name, adapter_name=name)
    return model


def _assert_computes_as(model, reference, x, what):
    with torch.no_grad():
        assert_rel_close(model(x), reference(x), 1e-6, name=what)


def test_each_adapter_computes_with_its_own_copy(base, folders):
    """Adapters with their own classifier loaded side by side (refused before: one classifier for all), and one
    without beside them, which computes with the base model's classifier, frozen."""
    served = _served(base, folders)
    assert served.qrlora_modules_to_save.names() == ["classifier"]
    x = torch.randn(3, 4, HIDDEN)
    alone = {name: _alone(base, folders / name) for name in ("a", "b", "plain")}
    with torch.no_grad():
        assert rel_error(alone["a"](x), alone["b"](x)) > 1e-2  # the heads differ
    _assert_computes_as(served, alone["a"], x, "the first loaded, a")
    weight = served.classifier.weight
    for name in ("b", "plain", "a", "plain", "b"):
        set_adapter(served, name)
        _assert_computes_as(served, alone[name], x, f"after set_adapter({name!r})")
        assert served.classifier.weight is weight  # the same Parameter, which an optimizer holds
        assert weight.requires_grad is (name != "plain")
        assert torch.equal(served.classifier.weight, alone[name].classifier.weight)


def test_the_order_of_loading_does_not_matter(base, folders):
    """An adapter without a classifier loaded first, then two with one: the base classifier is kept for it."""
    served = _served(base, folders, ("plain", "b", "a"))
    x = torch.randn(2, 4, HIDDEN)
    _assert_computes_as(served, _alone(base, folders / "plain"), x, "plain, loaded first")
    assert torch.equal(served.classifier.weight, base.classifier.weight)
    assert not served.classifier.weight.requires_grad
    set_adapter(served, "a")
    _assert_computes_as(served, _alone(base, folders / "a"), x, "a, loaded last")


def test_a_trained_model_takes_adapters_with_and_without_a_head(base, folders):
    """apply_qrlora keeps the base classifier before training it, so an adapter without one loads beside it (it
    was refused: the base values were gone)."""
    trained = _adapted(base, CONFIG)
    x = torch.randn(2, 4, HIDDEN)
    before = copy.deepcopy(trained)
    load_adapter(trained, folders / "plain", adapter_name="plain")
    load_adapter(trained, folders / "b", adapter_name="b")
    _assert_computes_as(trained, before, x, "the trained default adapter, still active")
    set_adapter(trained, "plain")
    _assert_computes_as(trained, _alone(base, folders / "plain"), x, "plain beside a trained head")
    set_adapter(trained, "default")
    _assert_computes_as(trained, before, x, "default again")


def test_save_adapter_writes_each_adapters_own_copy(base, folders, tmp_path):
    """save_adapter of an adapter the model does not compute with writes that adapter's classifier, not the one
    the module holds; an adapter without one writes none."""
    served = _served(base, folders)
    x = torch.randn(2, 4, HIDDEN)
    for name in ("b", "plain"):
        save_adapter(served, tmp_path / f"again_{name}", adapter_name=name)
        _assert_computes_as(_alone(base, tmp_path / f"again_{name}"), _alone(base, folders / name), x,
                            f"{name} saved again from the served model")
    import json
    meta = json.loads((tmp_path / "again_plain" / "adapter_config.json").read_text())
    assert meta["modules_to_save"] == {}


@pytest.mark.parametrize("how", ["load_adapter", "apply_qrlora"])
def test_replacing_an_adapter_replaces_its_copy(base, folders, how):
    """Overwriting an adapter that trained the classifier with a file without one computes with the base
    classifier (it was refused: the base values were gone); a file with one gives its classifier."""
    x = torch.randn(2, 4, HIDDEN)
    if how == "load_adapter":
        served, name = _alone(base, folders / "a"), "default"
    else:
        served, name = _adapted(base, CONFIG), "default"
    load_adapter(served, folders / "b", adapter_name=name)  # the copy the module holds, overwritten in place
    _assert_computes_as(served, _alone(base, folders / "b"), x, "replaced by another adapter with a head")
    load_adapter(served, folders / "plain", adapter_name=name)
    _assert_computes_as(served, _alone(base, folders / "plain"), x, "replaced by an adapter without a head")
    assert not served.qrlora_modules_to_save and not served.classifier.weight.requires_grad
    load_adapter(served, folders / "a", adapter_name=name)
    _assert_computes_as(served, _alone(base, folders / "a"), x, "replaced by an adapter with its own head")
    assert served.classifier.weight.requires_grad


def test_a_mixed_batch_gives_every_sequence_its_adapters_head(base, folders):
    served = _served(base, folders)
    order = ["b", "plain", "a", "b", "a"]
    x = torch.randn(len(order), 4, HIDDEN)
    alone = {name: _alone(base, folders / name) for name in set(order)}
    before = {k: v.clone() for k, v in served.state_dict().items()}
    for grad in (False, True):  # with gradients recorded too, where no copy trains (a frozen served model)
        served.requires_grad_(False)
        with torch.set_grad_enabled(grad), adapter_batch(served, order):
            mixed = served(x)
        with torch.no_grad():
            for i, name in enumerate(order):
                assert_rel_close(mixed[i], alone[name](x[i:i + 1])[0], 1e-6, name=f"sequence {i} ({name})")
    assert all(torch.equal(v, before[k]) for k, v in served.state_dict().items())  # the parameters not written


def test_a_mixed_batch_that_would_leave_a_copy_untrained_is_refused(base, folders):
    """Only the copy the module holds gets gradients: training a batch that also computes with another adapter's
    copy is refused; rows of adapters without a head (base values, frozen) may mix in."""
    served = _served(base, folders)
    set_adapter(served, "a")
    x = torch.randn(3, 4, HIDDEN)
    with pytest.raises(ValueError, match=r"classifier \(modules_to_save\) holds the copy of adapter 'a', and this "
                                         r"batch also computes with the copy of adapter 'b', which would get no "
                                         r"gradient while the model trains"):
        with adapter_batch(served, ["a", "b", "a"]):
            served(x)
    assert "forward" not in vars(served.classifier)  # the routing is gone after the block
    with adapter_batch(served, ["a", "plain", "a"]):
        served(x).square().sum().backward()
    grad = served.classifier.weight.grad
    x_a = x[[0, 2]]
    served.zero_grad()
    alone = _alone(base, folders / "a")
    alone(x_a).square().sum().backward()
    assert_rel_close(grad, alone.classifier.weight.grad, 1e-5, name="the head's gradient: a's rows only")
    # The module holding the base values (frozen) while the lam train: a's and b's rows would train their lam
    # and leave their heads untrained (this was accepted).
    set_adapter(served, "plain")
    with pytest.raises(ValueError, match=r"holds the base model's values, and this batch also computes with the "
                                         r"copy of adapter 'a'"):
        with adapter_batch(served, ["a", "b", "plain"]):
            served(x)


def test_a_mixed_batch_with_a_wrong_number_of_sequences_is_refused(base, folders):
    served = _served(base, folders)
    with torch.no_grad(), adapter_batch(served, ["a", "b"]):
        with pytest.raises(ValueError, match="holds 4 sequences, and adapter_batch was given 2 adapter ids"):
            served.classifier(torch.randn(4, HIDDEN))


def test_disable_adapters_computes_the_base_head_without_writing_it(base, folders):
    """disable_adapters refused models with modules_to_save (trained in place, base values gone). The base
    classifier is used without writing the trained one, so a graph recorded before the block backpropagates."""
    trained = _adapted(base, CONFIG)
    x = torch.randn(2, 4, HIDDEN)
    policy = trained(x).square().sum()
    with torch.no_grad(), disable_adapters(trained):
        reference = trained(x)
    policy.backward()
    with torch.no_grad():
        assert torch.equal(reference, base(x))
        assert rel_error(trained(x), base(x)) > 1e-2
    assert trained.classifier.weight.grad is not None


def test_tied_modules_to_save_refuse_what_they_cannot_do(base, folders):
    """A module that shares a weight with another (a tied LM head) switches in place, but disable_adapters and
    mixed batches would leave the other module computing with the trained values: refused, naming the tie."""
    tied = copy.deepcopy(base)
    tied.extra = nn.Linear(HIDDEN, 2)
    tied.extra.weight = tied.classifier.weight
    served = copy.deepcopy(tied)
    load_adapter(served, folders / "a", adapter_name="a")
    load_adapter(served, folders / "b", adapter_name="b")
    with pytest.raises(ValueError, match=r"classifier \(modules_to_save\) shares a parameter with extra\.weight"):
        with disable_adapters(served):
            pass
    with torch.no_grad(), adapter_batch(served, ["b", "a"]):
        with pytest.raises(ValueError, match=r"shares a parameter with extra\.weight \(tied weights\)"):
            served(torch.randn(2, 4, HIDDEN))
    with torch.no_grad(), adapter_batch(served, ["a", "a"]):  # one copy for all: nothing to route
        served(torch.randn(2, 4, HIDDEN))
    set_adapter(served, "b")
    assert torch.equal(served.extra.weight, _alone(base, folders / "b").classifier.weight)


def test_delete_merge_and_unload_take_the_right_copy(base, folders):
    x = torch.randn(2, 4, HIDDEN)
    served = _served(base, folders)
    set_adapter(served, "b")
    delete_adapter(served, "b")  # the active one goes: the first remaining (a) computes, with its head
    _assert_computes_as(served, _alone(base, folders / "a"), x, "a after deleting b")
    assert served.qrlora_modules_to_save.owned_by("b") == []
    delete_adapter(served, "a")  # no adapter trains the classifier any more: the base values, frozen
    assert torch.equal(served.classifier.weight, base.classifier.weight) and not served.qrlora_modules_to_save
    assert not served.classifier.weight.requires_grad

    for name in ("b", "plain"):  # merging an adapter the model does not compute with takes its head too
        merged = merge_and_unload(_served(base, folders), adapter_name=name)
        _assert_computes_as(merged, _alone(base, folders / name), x, f"merge_and_unload(adapter_name={name!r})")
    unloaded = _served(base, folders)
    set_adapter(unloaded, "b")
    unload(unloaded)  # PEFT's unload keeps the active adapter's copy of a module to save
    assert torch.equal(unloaded.classifier.weight, _alone(base, folders / "b").classifier.weight)
    assert not hasattr(unloaded, "qrlora_modules_to_save")


def test_copies_follow_the_modules_dtype(base, folders):
    """Copies kept in float32 serve a model cast to float64 afterwards, switched in or routed per sequence."""
    served = _served(base, folders).double()
    x = torch.randn(3, 4, HIDDEN, dtype=torch.float64)
    order = ["b", "a", "plain"]
    with torch.no_grad(), adapter_batch(served, order):
        mixed = served(x)
    with torch.no_grad():
        for i, name in enumerate(order):
            assert_rel_close(mixed[i], _alone(base, folders / name).double()(x[i:i + 1])[0], 1e-12,
                             name=f"sequence {i} ({name}) in float64")
    set_adapter(served, "b")
    assert served.classifier.weight.dtype == torch.float64
    assert torch.equal(served.classifier.weight, _alone(base, folders / "b").classifier.weight.double())


def test_llama_beams_keep_their_sequences_lm_head(tmp_path):
    """generate() with beams through a mixed batch of adapters that each trained the LM head: every sequence's
    beams use its adapter's head (the module's input is k times as long as the ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    tuned = {}
    for task in ("chat", "code"):
        tuned[task] = copy.deepcopy(base)
        apply_qrlora(tuned[task], QRLoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
                     progress=False)
        with torch.no_grad():
            for p in tuned[task].parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        save_adapter(tuned[task], tmp_path / task)
    served = copy.deepcopy(base)
    for task in tuned:
        load_adapter(served, tmp_path / task, adapter_name=task)
    order = ["code", "chat", "code"]
    prompt = torch.randint(0, 96, (3, 5))
    settings = dict(attention_mask=torch.ones(3, 5, dtype=torch.long), max_new_tokens=4, do_sample=False,
                    num_beams=2, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad(), adapter_batch(served, order):
        beams = served.generate(input_ids=prompt, **settings)
    with torch.no_grad():
        for i, task in enumerate(order):
            alone = tuned[task].generate(input_ids=prompt[i:i + 1], **{**settings,
                                                                       "attention_mask": settings["attention_mask"][:1]})
            assert torch.equal(beams[2 * i:2 * i + 2], alone), f"sequence {i} ({task})"


def test_sharded_modules_refuse_to_switch_or_route(base, folders):
    """An FSDP2-sharded module (its parameters DTensors, marked by their device_mesh) cannot take other values in
    place or be called with plain ones: refused, naming it, before anything changes."""
    served = _served(base, folders)
    served.classifier.weight.device_mesh = "a mesh"  # what fully_shard leaves on a DTensor parameter
    held = served.classifier.weight.detach().clone()
    rows = [layer.active_adapter for _, layer in qrlora_layers(served)]
    with pytest.raises(ValueError, match=r"classifier: its parameters are sharded \(FSDP2 fully_shard"):
        set_adapter(served, "b")
    assert torch.equal(served.classifier.weight, held) and getattr(served, "qrlora_active_adapter", None) is None
    assert [layer.active_adapter for _, layer in qrlora_layers(served)] == rows
    for block in (lambda: disable_adapters(served), lambda: adapter_batch(served, ["a", "b"])):
        with pytest.raises(ValueError, match=r"classifier: its parameters are sharded"):
            with torch.no_grad(), block():
                served(torch.randn(2, 4, HIDDEN))
    with pytest.raises(ValueError, match=r"classifier: its parameters are sharded"):
        load_adapter(served, folders / "b", adapter_name="a")  # the copy the module holds, overwritten
    assert served.qrlora_adapter_ids == {"a": 0, "b": 1, "plain": 2} and torch.equal(served.classifier.weight, held)
    load_adapter(served, folders / "b", adapter_name="c")  # kept beside it: nothing written into the module
    assert served.qrlora_modules_to_save.owners("classifier") == ["a", "b", "c"]
    set_adapter(served, "a")  # the values it holds: nothing to switch
    with torch.no_grad(), adapter_batch(served, ["a", "a"]):
        served(torch.randn(2, 4, HIDDEN))


def test_blocks_nest_and_disabling_wins(base, folders):
    """disable_adapters inside or around an adapter_batch gives the base model in every row, as the QR-LoRA
    layers do (the inner block used to route through the outer one: a row kept its adapter's head, or the
    inner block miscounted the sequences); each block's end gives the outer one back."""
    served = _served(base, folders)
    x = torch.randn(2, 4, HIDDEN)
    order = ["a", "b"]
    with torch.no_grad():
        expected = base(x)
        with adapter_batch(served, order):
            with disable_adapters(served):
                assert_rel_close(served(x), expected, 1e-6, name="disable_adapters inside adapter_batch")
            mixed = served(x)
        with disable_adapters(served):
            with adapter_batch(served, order):
                assert_rel_close(served(x), expected, 1e-6, name="adapter_batch inside disable_adapters")
            assert_rel_close(served(x), expected, 1e-6, name="after the inner block")
        with adapter_batch(served, ["b", "b"]):
            with adapter_batch(served, order):  # the innermost ids decide
                assert torch.equal(served(x), mixed)
        for i, name in enumerate(order):
            assert_rel_close(mixed[i], _alone(base, folders / name)(x[i:i + 1])[0], 1e-6, name=f"row {i}")
    assert "forward" not in vars(served.classifier)


def test_a_block_that_raises_gives_the_module_back(base, folders):
    served = _served(base, folders)
    own = lambda h: nn.Linear.forward(served.classifier, h)  # an instance's own forward, as accelerate sets one
    served.classifier.forward = own
    with pytest.raises(RuntimeError, match="inside"):
        with torch.no_grad(), adapter_batch(served, ["a", "b"]):
            raise RuntimeError("inside")
    assert served.classifier.forward is own


def test_a_frozen_model_stays_frozen(base, folders, tmp_path):
    """A model frozen for serving (model.requires_grad_(False)): set_adapter and load_adapter used to make the
    classifier trainable again, and a mixed batch with gradients enabled was then refused."""
    served = _served(base, folders)
    served.requires_grad_(False)
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["query"], modules_to_save=["classifier"])),
                 tmp_path / "narrow")
    narrow = copy.deepcopy(base)
    load_adapter(narrow, tmp_path / "narrow")
    narrow.requires_grad_(False)
    load_adapter(narrow, folders / "b", adapter_name="b")  # builds the value layers: their lam stay frozen too
    set_adapter(narrow, "b")
    assert not any(p.requires_grad for p in narrow.parameters())
    for step in (lambda: set_adapter(served, "b"), lambda: set_adapter(served, "plain"),
                 lambda: set_adapter(served, "a"), lambda: load_adapter(served, folders / "b", adapter_name="c"),
                 lambda: load_adapter(served, folders / "b", adapter_name="a")):
        step()
        assert not any(p.requires_grad for p in served.parameters())
    with adapter_batch(served, ["a", "b"]):
        served(torch.randn(2, 4, HIDDEN))  # nothing trains: no copy would be left without its gradient


class _Pair(nn.Module):
    """A module to save whose forward returns a tuple (or a namedtuple) of batch-first tensors."""
    def __init__(self, named):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, 2)
        self.named = named

    def forward(self, h, scale=1.0):
        from collections import namedtuple
        out = (self.proj(h) * scale, h.sum(-1))
        return namedtuple("Out", "logits total")(*out) if self.named else out


class _PairModel(TinyModel):
    def __init__(self, named):
        super().__init__()
        self.pair = _Pair(named)

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return self.pair(h, scale=torch.full((h.shape[0], 1, 1), 2.0))[0]


@pytest.mark.parametrize("named", [False, True], ids=["tuple", "namedtuple"])
def test_tuple_outputs_and_batch_first_keywords_are_split_and_joined(tmp_path, named):
    torch.manual_seed(0)
    base = _PairModel(named).eval()
    config = QRLoraConfig(target_modules=["query", "value"], modules_to_save=["pair"])
    for name in ("a", "b"):
        save_adapter(_adapted(base, config), tmp_path / name)
    served = _served(base, tmp_path, ("a", "b"))
    x = torch.randn(3, 4, HIDDEN)
    order = ["b", "a", "b"]
    with torch.no_grad(), adapter_batch(served, order):
        mixed = served(x)
        out = served.pair(x, scale=torch.ones(3, 1, 1))
        assert type(out).__name__ == ("Out" if named else "tuple") and out[1].shape == (3, 4)
        with pytest.raises(ValueError, match="pair: cannot tell its input's sequences apart"):
            served.pair(h=2.0)
    with torch.no_grad():
        for i, name in enumerate(order):
            assert_rel_close(mixed[i], _alone(base, tmp_path / name)(x[i:i + 1])[0], 1e-6, name=f"row {i}")


def test_an_output_that_cannot_be_joined_is_refused_by_name(tmp_path):
    class DictHead(nn.Linear):
        def forward(self, h):
            return {"logits": super().forward(h)}

    class Model(TinyModel):
        def __init__(self):
            super().__init__()
            self.classifier = DictHead(HIDDEN, 2)

        def forward(self, h):
            return self.classifier(h)["logits"]
    torch.manual_seed(0)
    base = Model().eval()
    for name in ("a", "b"):
        save_adapter(_adapted(base, CONFIG), tmp_path / name)
    served = _served(base, tmp_path, ("a", "b"))
    with torch.no_grad(), adapter_batch(served, ["a", "b"]):
        with pytest.raises(TypeError, match="classifier: its forward returns dict, which a batch mixing adapters"):
            served(torch.randn(2, 4, HIDDEN))


def test_modules_to_save_that_nest_with_another_adapters_are_refused(base, tmp_path):
    """A classifier trained by one adapter and its inner layer trained in full, or adapted, by another: taking one
    copy in overwrote part of the other (values lost after a few set_adapter calls), and an adapter adapting a
    layer inside another's head was refused as "base weight differs", or loaded and broke set_adapter later."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.out = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 2)

        def forward(self, h):
            return self.out(torch.tanh(self.dense(h)))

    class Model(TinyModel):
        def __init__(self):
            super().__init__()
            self.classifier = Head()
    torch.manual_seed(0)
    model = Model().eval()
    configs = {"head": CONFIG, "inner": QRLoraConfig(target_modules=["query"], modules_to_save=["classifier.out"]),
               "adapts_inner": QRLoraConfig(target_modules=["query", "dense"]),
               "adapts_out": QRLoraConfig(target_modules=["query", "out"]),
               "plain": NO_HEAD}
    for name, config in configs.items():
        save_adapter(_adapted(model, config), tmp_path / name)
    for first, second, message in (
            ("head", "inner", r"classifier\.out \(modules_to_save\) and classifier, which adapter\(s\) 'head' train "
                              r"in full, lie one inside the other"),
            ("inner", "head", r"classifier \(modules_to_save\) and classifier\.out, which adapter\(s\) 'inner'"),
            ("head", "adapts_inner", r"classifier\.dense: adapter\(s\) 'head' train classifier, which holds it, in "
                                     r"full \(modules_to_save\): another adapter cannot adapt it"),
            ("adapts_inner", "head", r"classifier \(modules_to_save\) holds the QR-LoRA layer classifier\.dense"),
            ("inner", "adapts_out", r"classifier\.out: adapter\(s\) 'inner' train it in full"),
            ("adapts_out", "inner", r"classifier\.out \(modules_to_save\) is the QR-LoRA layer classifier\.out")):
        for between in ((), ("plain",)):
            served = copy.deepcopy(model)
            for name in (first, *between):
                load_adapter(served, tmp_path / name, adapter_name=name)
            before = {k: v.clone() for k, v in served.state_dict().items()}
            with pytest.raises(ValueError, match=message):
                load_adapter(served, tmp_path / second, adapter_name=second)
            assert served.state_dict().keys() == before.keys()
            assert all(torch.equal(v, before[k]) for k, v in served.state_dict().items())
    # Replacing an adapter under its own name drops its copies: they do not stand in the way (they did), unless
    # the model computes with the copy that a layer of the new adapter would replace (refused, nothing changed:
    # it left a QR-LoRA layer inside the module and copies that no longer fit it).
    x = torch.randn(2, 4, HIDDEN)
    for first, second in (("head", "inner"), ("inner", "head"), ("head", "adapts_inner"), ("inner", "adapts_out")):
        served = copy.deepcopy(model)
        load_adapter(served, tmp_path / "plain", adapter_name="plain")
        load_adapter(served, tmp_path / first, adapter_name="task")
        if second.startswith("adapts"):
            set_adapter(served, "task")
            before = {k: v.clone() for k, v in served.state_dict().items()}
            with pytest.raises(ValueError, match=r"adapter 'task', being replaced, trains (it|classifier, which holds "
                                                 r"it,) in full \(modules_to_save\), and the model computes with "
                                                 r"that copy"):
                load_adapter(served, tmp_path / second, adapter_name="task")
            assert all(torch.equal(v, before[k]) for k, v in served.state_dict().items())
            set_adapter(served, "plain")
            alone = _alone(model, tmp_path / first)
            with pytest.raises(ValueError, match=r"with that copy: unload\(model\) first, or load it into a fresh "
                                                 r"base model"):
                load_adapter(alone, tmp_path / second)
        load_adapter(served, tmp_path / second, adapter_name="task")
        set_adapter(served, "task")
        _assert_computes_as(served, _alone(model, tmp_path / second), x, f"{first} replaced by {second}")
        set_adapter(served, "plain")
        _assert_computes_as(served, _alone(model, tmp_path / "plain"), x, f"plain beside {second}")


def test_one_copy_for_the_whole_batch_needs_no_batch_dimension(tmp_path):
    """A module to save whose input has no batch dimension of the ids' size (BERT's position embeddings take
    position ids of shape [1, T]) works as before when every sequence uses the same copy of it."""
    class Model(TinyModel):
        def __init__(self):
            super().__init__()
            self.positions = nn.Embedding(8, HIDDEN)

        def forward(self, h):
            return super().forward(h + self.positions(torch.arange(h.shape[1])[None]))
    torch.manual_seed(0)
    model = Model().eval()
    config = QRLoraConfig(target_modules=["query", "value"], modules_to_save=["positions", "classifier"])
    for name in ("a", "b"):
        save_adapter(_adapted(model, config), tmp_path / name)
    served = _served(model, tmp_path, ("a", "b"))
    x = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        with adapter_batch(served, ["b", "b"]):
            assert_rel_close(served(x), _alone(model, tmp_path / "b")(x), 1e-6, name="b for both sequences")
        with adapter_batch(served, ["a", "b"]):
            with pytest.raises(ValueError, match="positions: its input holds 1 sequences, and adapter_batch was "
                                                 "given 2 adapter ids"):
                served(x)


def test_copies_made_under_inference_mode_serve_training_later(base, folders):
    """set_adapter under torch.inference_mode() kept the outgoing values as inference tensors, which a later
    training step could not save for backward."""
    served = _served(base, folders)
    set_adapter(served, "plain")
    with torch.inference_mode():
        set_adapter(served, "b")  # the base values go out here,
        set_adapter(served, "a")  # and b's here
    x = torch.randn(3, 4, HIDDEN)
    with adapter_batch(served, ["a", "plain", "a"]):
        served(x).square().sum().backward()
    assert served.classifier.weight.grad is not None
    served.requires_grad_(False)
    with adapter_batch(served, ["b", "plain", "a"]):
        served(x)


def test_copied_and_pickled_models_keep_their_copies(base, folders):
    """A deepcopy (a reference model for DPO) or a whole-model pickle of a model with copies: the marker of the
    copy the module holds was a fresh object() after copying, and every later operation failed."""
    served = _served(base, folders)
    x = torch.randn(3, 4, HIDDEN)
    for twin in (copy.deepcopy(served), pickle.loads(pickle.dumps(served))):
        set_adapter(twin, "b")
        _assert_computes_as(twin, _alone(base, folders / "b"), x, "b in the copy")
        with torch.no_grad(), adapter_batch(twin, ["a", "plain", "b"]):
            mixed = twin(x)
        with torch.no_grad():
            assert_rel_close(mixed[0], _alone(base, folders / "a")(x[:1])[0], 1e-6, name="a's row in the copy")
        with torch.no_grad(), disable_adapters(twin):
            assert torch.equal(twin(x), base(x))
        save_adapter(twin, folders / "from_twin", adapter_name="b")
        _assert_computes_as(_alone(base, folders / "from_twin"), _alone(base, folders / "b"), x, "b saved again")
    _assert_computes_as(served, _alone(base, folders / "a"), x, "the original, untouched")


def test_a_copy_made_inside_a_block_is_a_plain_model(base, folders):
    """A deepcopy of the model inside a block kept the routing of the original module (computing with its
    parameters, or failing once the block ended)."""
    served = _served(base, folders)
    x = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        with adapter_batch(served, ["a", "b"]):
            inside = copy.deepcopy(served)
        with disable_adapters(served):
            disabled = copy.deepcopy(served)
        _assert_computes_as(inside, _alone(base, folders / "a"), x, "copied inside adapter_batch")
        _assert_computes_as(disabled, _alone(base, folders / "a"), x, "copied inside disable_adapters")
        set_adapter(inside, "b")
        _assert_computes_as(inside, _alone(base, folders / "b"), x, "its own classifier")
        _assert_computes_as(served, _alone(base, folders / "a"), x, "the original")
        # A pickle made inside a block (it held the block's closures: "Can't pickle local object"), and a
        # shallow copy of a routed module called after the block (it failed).
        with adapter_batch(served, ["a", "b"]):
            pickled = pickle.loads(pickle.dumps(served))
            shallow = copy.copy(served.classifier)
        _assert_computes_as(pickled, _alone(base, folders / "a"), x, "pickled inside adapter_batch")
        h = torch.randn(2, HIDDEN)
        assert torch.equal(shallow(h), served.classifier(h))


def test_a_copy_made_inside_a_block_generates_with_its_own_weights(tmp_path):
    """The block's generate() wrapper, a closure over the original model, went into a deepcopy made inside the
    block: the copy's generate() ran the original model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    model = copy.deepcopy(base)
    apply_qrlora(model, QRLoraConfig(target_modules=["q_proj", "v_proj"]), progress=False)
    prompt = torch.randint(0, 64, (2, 5))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with adapter_batch(model, ["default", "default"]):
            twin = copy.deepcopy(model)
        assert "generate" not in vars(model)
        for module in twin.modules():
            if hasattr(module, "lam"):
                module.lam.normal_(0.0, 3.0)
        assert not torch.equal(twin.generate(prompt, **settings), model.generate(prompt, **settings))
        with adapter_batch(model, ["default", "default"]):
            assert torch.equal(model.generate(prompt, **settings), base.generate(prompt, **settings))
        # Nested blocks on a model with generate (an inner block's wrapper took the outer one's attributes: beams
        # failed inside, and leaving the blocks deleted the model's generate).
        beams = dict(settings, num_beams=2)
        with adapter_batch(model, ["default", "default"]):
            with adapter_batch(model, ["default", "default"]):
                assert torch.equal(model.generate(prompt, **beams), base.generate(prompt, **beams))
            assert torch.equal(model.generate(prompt, **beams), base.generate(prompt, **beams))
        assert "generate" not in vars(model) and model.generate(prompt, **settings).shape == (2, 11)


@pytest.fixture
def one_process_group():
    """A gloo process group of one process, for DDP and FSDP2 on the CPU; destroyed afterwards."""
    import socket
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_wrapped_and_sharded_models_refuse_what_they_cannot_follow(base, folders, one_process_group):
    """Under DDP a head that starts or stops training is never synchronised (DDP keeps the parameters it was
    given): set_adapter and an in-place load that would do it are refused, while a switch between two trained
    copies works. Under FSDP1 and FSDP2 a head is refused once it would take other values, also right after a
    forward (FSDP2's parameters are plain tensors then) and in a block (whose mixed batch destroyed the kept
    copies). (Given the model inside DDP, e.g. ``ddp.module``, nothing tells that it is wrapped.)"""
    served = _served(base, folders)
    set_adapter(served, "plain")
    ddp = nn.parallel.DistributedDataParallel(served)
    with pytest.raises(ValueError, match=r"classifier \(modules_to_save\) would start training with the copy of "
                                         r"adapter 'b', and DistributedDataParallel keeps the set of trained"):
        set_adapter(ddp, "b")
    with pytest.raises(ValueError, match=r"adapter 'plain', which the model computes with, would train other "
                                         r"modules_to_save \(classifier instead of none\)"):
        load_adapter(ddp, folders / "b", adapter_name="plain")
    assert served.qrlora_modules_to_save.owned_by("plain") == []
    trained = _served(base, folders)
    ddp = nn.parallel.DistributedDataParallel(trained)
    set_adapter(ddp, "b")  # a's trained copy for b's: the same parameters train
    _assert_computes_as(trained, _alone(base, folders / "b"), torch.randn(2, 4, HIDDEN), "b under DDP")

    # FSDP1's flat parameters hide the module's own during a forward, so functional_call computed with the held
    # copy (wrong rows on 2 ranks, no error): refused by name, as is a switch.
    from torch.distributed.fsdp import FullyShardedDataParallel
    inner = _served(base, folders)
    flat = FullyShardedDataParallel(inner, device_id=torch.device("cpu"), use_orig_params=True)
    with pytest.raises(ValueError, match=r"classifier: its parameters are flattened and sharded by "
                                         r"FullyShardedDataParallel"):
        set_adapter(flat, "b")
    for block in (lambda: disable_adapters(flat), lambda: adapter_batch(flat, ["a", "b"])):
        with pytest.raises(ValueError, match=r"classifier: its parameters are flattened and sharded by "
                                             r"FullyShardedDataParallel"):
            with torch.no_grad(), block():
                inner.classifier(torch.randn(2, HIDDEN))  # (the head alone: its refusal, whatever FSDP1 does first)

    from test_distributed import FSDP2_ON_CPU
    if not FSDP2_ON_CPU:
        pytest.skip(f"torch {torch.__version__}'s FSDP2 needs a GPU")
    from torch.distributed.fsdp import fully_shard
    x = torch.randn(2, 4, HIDDEN)
    for own_unit in (False, True):
        sharded = _served(base, folders)
        copies = sharded.qrlora_modules_to_save
        kept = {k: v.clone() for k, v in copies.values(sharded, "classifier", "b").items()}
        for block in sharded.layers:
            fully_shard(block)
        if own_unit:
            fully_shard(sharded.classifier)
        fully_shard(sharded)
        with torch.no_grad():
            sharded(x)  # (the root unit's parameters stay plain tensors after a forward without gradients)
        with pytest.raises(ValueError, match=r"classifier: its parameters are sharded \(FSDP2 fully_shard"):
            set_adapter(sharded, "b")
        for block in (lambda: disable_adapters(sharded), lambda: adapter_batch(sharded, ["a", "b"])):
            with pytest.raises(ValueError, match=r"classifier: its parameters are sharded"):
                with torch.no_grad(), block():
                    sharded(x)
        assert all(torch.equal(v, kept[k]) for k, v in copies.values(sharded, "classifier", "b").items())
