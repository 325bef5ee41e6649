"""save_adapter / load_adapter: tiny files, exact reloads, multi-adapter loading, and every failure named."""
import copy
import dataclasses
import json
import os
import stat
import struct
import types
import warnings

import pytest
import torch
from torch import nn

from qrlora_kernels import QRLoraConfig, QRLoraLinear, apply_qrlora, load_adapter, save_adapter
from qrlora_kernels.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _fingerprint_problem, weight_fingerprint
from qrlora_kernels.model import adapter_batch, qrlora_layers
from qrlora_kernels.testing import assert_rel_close, rel_error

from fake_hub import FakeHub

HIDDEN = 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, h):
        return self.norm(h + torch.tanh(self.query(h)) * self.value(h))


class TinyModel(nn.Module):
    def __init__(self, num_layers=3):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(num_layers))
        self.classifier = nn.Linear(HIDDEN, 2)

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return self.classifier(h)


CONFIG = QRLoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"])


def _adapted(base, config=CONFIG, scale=0.5):
    """A converted copy of ``base`` with random (trained-looking) lam and classifier."""
    model = copy.deepcopy(base)
    apply_qrlora(model, config, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture
def base():
    return TinyModel().eval()


@pytest.mark.parametrize("config", [CONFIG, dataclasses.replace(CONFIG, qr_method="randomized")],
                         ids=["geqp3", "randomized"])
def test_round_trip_from_pivots_reproduces_outputs(base, tmp_path, config):
    model = _adapted(base, config)
    x = torch.randn(3, 4, HIDDEN)
    expected = model(x)
    paths = save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    assert paths["weights"] == tmp_path / ADAPTER_WEIGHTS
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["include_basis"] is False and QRLoraConfig.from_dict(meta["config"]) == config
    from safetensors.torch import load_file
    stored = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert not any(k.endswith((".Q", ".R")) for k in stored)  # no basis by default: O(total r)
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == {"default": 0}
    assert_rel_close(fresh(x), expected, 1e-5, name="reloaded output")
    for name, layer in qrlora_layers(fresh):
        original = model.get_submodule(name)
        assert torch.equal(layer.perm[:layer.rank], original.perm[:original.rank])
        assert_rel_close(layer.Q, original.Q, 1e-5, name=f"{name}.Q")
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_progress_bar_while_the_bases_are_rebuilt(base, tmp_path, capsys):
    save_adapter(_adapted(base), tmp_path)
    load_adapter(copy.deepcopy(base), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "QR-LoRA adapter modules" in err and "/6 [" in err  # a bar over 3 blocks x (query, value)
    load_adapter(copy.deepcopy(base), tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_bars_follow_tqdm_disable_and_rank_zero(monkeypatch, capsys):
    from qrlora_kernels import distributed
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    for env, rank, shown in (("", 0, True), ("1", 0, False), ("", 1, False)):
        monkeypatch.setenv("TQDM_DISABLE", env)
        monkeypatch.setattr(distributed, "world_info", lambda group=None, rank=rank: (rank, 2))
        with distributed.module_progress(3, None, "bar") as bar:
            assert bar.disable is not shown, (env, rank)
    monkeypatch.setattr(distributed, "world_info", lambda group=None: (1, 2))
    with distributed.module_progress(3, True, "bar") as bar:  # even asked for, only rank 0 draws it
        assert bar.disable


def test_include_basis_reloads_bit_exactly(base, tmp_path):
    model = _adapted(base)
    save_adapter(model, tmp_path, include_basis=True)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    x = torch.randn(2, 5, HIDDEN)
    assert torch.equal(fresh(x), model(x))
    for name, layer in qrlora_layers(fresh):
        assert torch.equal(layer.Q, model.get_submodule(name).Q) and torch.equal(layer.R, model.get_submodule(name).R)


def test_writes_are_atomic(base, tmp_path, monkeypatch):
    model = _adapted(base)
    save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import qrlora_kernels.atomic_file as atomic_file

    def fail(_fd):
        raise OSError("disk full")
    monkeypatch.setattr(atomic_file.os, "fsync", fail)
    with torch.no_grad():
        model.layers[0].query.lam.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no temp files left


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_save_failing_between_its_two_files_keeps_the_previous_adapter(base, tmp_path, monkeypatch, failure, links):
    """The weights and the config are one write: a failure at the second rename puts the first file back, so the
    folder still holds the previous adapter, whole and loadable; into an empty folder it leaves nothing."""
    import qrlora_kernels.atomic_file as atomic_file
    model = _adapted(base)
    save_adapter(model, tmp_path / "kept")
    expected = copy.deepcopy(base)
    load_adapter(expected, tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()}
    replace, renames = os.replace, []

    def second_rename_fails(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise failure
        return replace(src, dst)

    def interrupted_as_a_rename_returns(src, dst):  # where CPython raises a Ctrl-C that came during the call
        renames.append(dst)
        replace(src, dst)
        if len(renames) == when:
            raise failure
    monkeypatch.setattr(atomic_file.os, "replace", second_rename_fails)
    if not links:
        def no_links(*_):
            raise OSError("hard links not supported")
        monkeypatch.setattr(atomic_file.os, "link", no_links)
    with torch.no_grad():
        model.layers[0].query.lam.add_(1.0)
    for folder in ("kept", "new"):
        renames.clear()
        with pytest.raises(type(failure)):
            save_adapter(model, tmp_path / folder)
        assert len(renames) >= 2
    monkeypatch.setattr(atomic_file.os, "replace", interrupted_as_a_rename_returns)
    for when in (1, 2):  # after the first file's rename, and after the second's
        for folder in ("kept", "new"):
            renames.clear()
            with pytest.raises(type(failure)):
                save_adapter(model, tmp_path / folder)
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before  # nothing else left behind
    assert list((tmp_path / "new").iterdir()) == []
    monkeypatch.undo()
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "kept")
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected(x))


def test_atomic_write_files_refuses_one_file_twice(tmp_path):
    from qrlora_kernels.atomic_file import atomic_write_files
    with pytest.raises(ValueError, match="the same file twice"):
        atomic_write_files({str(tmp_path / "a"): b"1", f"{tmp_path}/./a": b"2"})
    assert not list(tmp_path.iterdir())


def test_budget_601_on_roberta_base_dims_gives_a_file_under_16kb(tmp_path):
    # True roberta-base query/value shapes (768x768, 12 layers); a small vocabulary keeps the build fast.
    from transformers import RobertaConfig, RobertaModel
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=128, max_position_embeddings=40), add_pooling_layer=False).eval()
    report = apply_qrlora(model, QRLoraConfig(target_modules=["query", "value"], budget=601), progress=False)
    assert report.adapter_params == 601
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 601
    save_adapter(model, tmp_path)
    size = (tmp_path / ADAPTER_WEIGHTS).stat().st_size
    assert size < 16 * 1024, f"adapter file is {size} bytes"
    assert (tmp_path / ADAPTER_CONFIG).stat().st_size < 32 * 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saving_after_merge_and_unmerge_warns_that_the_base_will_refuse_it(base, tmp_path, dtype):
    """unmerge() gives W0 back up to rounding only (W0 + dW - dW): the saved adapter names the rounded weight and
    load_adapter refuses the real base model. save_adapter said nothing; it warns now, while the layer holds the
    weight unmerge() made, unchanged."""
    model = _adapted(base.to(dtype), QRLoraConfig(target_modules=["query", "value"], rank=6))
    layers = [layer for _, layer in qrlora_layers(model)]
    for layer in layers:
        layer.merge()
        layer.unmerge()
    with pytest.warns(UserWarning, match=r"6 layer\(s\) \(layers.0.query, layers.0.value, layers.1.query, \.\.\.\) "
                                         r"were merged and unmerged, .* load_adapter will refuse the original base"):
        save_adapter(model, tmp_path / "rounded")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="differs"):  # what the warning is about
        load_adapter(fresh, tmp_path / "rounded")
    import pickle
    pickle.dumps(layers[0])  # the record of the unmerged weight is plain ints
    # A weight from elsewhere (a load, a write in place) is no longer the unmerged one: no warning.
    for layer, (name, _) in zip(layers, qrlora_layers(model)):
        with torch.no_grad():
            layer.weight.copy_(base.get_submodule(name).weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "restored")
    load_adapter(copy.deepcopy(base), tmp_path / "restored")


def test_fingerprint_sees_a_change_anywhere():
    weight = torch.randn(100, 100)
    saved = weight_fingerprint(weight)
    assert _fingerprint_problem(weight.clone(), saved) is None
    assert weight_fingerprint(weight.t().contiguous().t()) == saved  # the layout does not count, only the values
    changed = weight.clone()
    changed.view(-1)[1] += 1e-3  # not one of the sampled positions: only the sums can see it
    assert "fingerprint does not match" in _fingerprint_problem(changed, saved)
    assert "shape (100, 99)" in _fingerprint_problem(weight[:, :99], saved)
    # Two entries swapped (the sum and the sum of squares stay), at positions the byte sample does not see: in one
    # row, in one column, or in neither.
    from qrlora_kernels.adapter_io import FINGERPRINT_SAMPLES
    sampled = set((torch.arange(FINGERPRINT_SAMPLES) * 10_000 // FINGERPRINT_SAMPLES).tolist())
    unsampled = [(i // 100, i % 100) for i in range(10_000) if i not in sampled]
    a = unsampled[0]
    pairs = [(a, next(p for p in unsampled[1:] if p[0] == a[0])), (a, next(p for p in unsampled[1:] if p[1] == a[1])),
             (a, next(p for p in unsampled[1:] if p[0] != a[0] and p[1] != a[1]))]
    for a, b in pairs:
        swapped = weight.clone()
        swapped[a], swapped[b] = weight[b], weight[a]
        assert float(swapped.sum()) == pytest.approx(float(weight.sum()))
        assert "fingerprint does not match" in _fingerprint_problem(swapped, saved), (a, b)
    # A fingerprint saved before the position-weighted sums existed still matches (and checks what it has).
    earlier = {k: v for k, v in saved.items() if k != "moment"}
    assert _fingerprint_problem(weight.clone(), earlier) is None
    assert _fingerprint_problem(changed, earlier) is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fingerprints_written_by_earlier_versions_still_match(dtype):
    """Files from before the sum of squares became a dot product (one float64 copy less) hold
    ``w.double().square().sum()``: another reduction order, so the last bits differ, within the tolerance."""
    weight = (torch.randn(300, 257, dtype=torch.float64) * 3 + 0.5).to(dtype).t()  # non-contiguous too
    now = weight_fingerprint(weight)
    earlier = dict(now, sum=float(weight.double().sum()), sum_sq=float(weight.double().square().sum()))
    assert _fingerprint_problem(weight, earlier) is None
    assert _fingerprint_problem(weight, dict(earlier, sum_sq=earlier["sum_sq"] * (1 + 1e-6))) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_fingerprint_in_another_dtype_is_that_of_the_converted_weight(dtype):
    """weight_fingerprint(w, dtype) samples, then rounds (no converted copy for the hash): the same bytes as
    fingerprinting w.to(dtype), which is what adapter files hold."""
    weight = torch.randn(70, 90, dtype=torch.float64).t()
    assert weight_fingerprint(weight, dtype) == weight_fingerprint(weight.to(dtype))
    assert weight_fingerprint(weight, dtype, cache=True) == weight_fingerprint(weight.to(dtype))


def test_repeated_loads_reuse_the_fingerprint_sums_but_still_see_a_changed_weight(base, tmp_path, monkeypatch):
    """A server loads many adapters onto one base: each load checks every base weight, and the float64 sums (a
    pass over the weight) are kept per tensor and version. An in-place change bumps the version; a change through
    .data does not, and is seen by the sample hash, recomputed every time, at a sampled position."""
    import qrlora_kernels.adapter_io as adapter_io
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["query", "value"])), tmp_path / "a")
    served = copy.deepcopy(base)
    load_adapter(served, tmp_path / "a", adapter_name="a")
    passes = []
    dot = torch.dot
    monkeypatch.setattr(adapter_io.torch, "dot", lambda a, b: passes.append(a.numel()) or dot(a, b))
    load_adapter(served, tmp_path / "a", adapter_name="b")
    after_b = len(passes)
    load_adapter(served, tmp_path / "a", adapter_name="c")
    assert len(passes) == after_b  # the third load made no pass over any weight
    value = served.layers[1].value
    with torch.no_grad():
        value.weight[5, 7] += 1e-3  # not a sampled position: only the sums see it
    with pytest.raises(ValueError, match=r"layers\.1\.value: its base weight differs"):
        load_adapter(served, tmp_path / "a", adapter_name="d")
    with torch.no_grad():
        value.weight[5, 7] -= 1e-3
    load_adapter(served, tmp_path / "a", adapter_name="d")
    value.weight.data[0, 0] += 1.0  # position 0 is sampled
    with pytest.raises(ValueError, match=r"layers\.1\.value: its base weight differs"):
        load_adapter(served, tmp_path / "a", adapter_name="e")


def test_a_server_under_inference_mode_loads_and_saves_and_still_sees_a_changed_weight(base, tmp_path):
    """Inference tensors have no version counter: their fingerprint sums are never kept (reading the version
    raised inside inference_mode, and outside it an in-place change left the cached sums in place)."""
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["query", "value"])), tmp_path / "a")
    with torch.inference_mode():
        served = copy.deepcopy(base)
        for p in served.parameters():
            p.data = p.data.clone()  # inference tensors, as a model loaded under inference_mode holds
        assert served.layers[1].value.weight.is_inference()
        load_adapter(served, tmp_path / "a", adapter_name="a")
        load_adapter(served, tmp_path / "a", adapter_name="b")
        save_adapter(served, tmp_path / "saved", adapter_name="b")
        served.layers[1].value.weight[5, 7] += 1e-3  # not a sampled position: only the sums see it
    with pytest.raises(ValueError, match=r"layers\.1\.value: its base weight differs"):
        load_adapter(served, tmp_path / "a", adapter_name="c")
    with torch.inference_mode(), pytest.raises(ValueError, match=r"layers\.1\.value: its base weight differs"):
        load_adapter(served, tmp_path / "a", adapter_name="c")


def test_load_errors_name_the_module(base, tmp_path):
    model = _adapted(base)
    save_adapter(model, tmp_path)
    other = TinyModel().eval()
    with pytest.raises(ValueError, match=r"layers\.0\.query: its base weight differs.*fingerprint"):
        load_adapter(other, tmp_path)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.layers[1].value.weight[3, 5] += 0.01
    with pytest.raises(ValueError, match=r"layers\.1\.value: its base weight differs"):
        load_adapter(changed, tmp_path)
    assert not qrlora_layers(changed)  # a failed load leaves the model untouched
    shorter = copy.deepcopy(base)
    del shorter.layers[2]
    with pytest.raises(ValueError, match=r"layers\.2\.query: module not found in the model"):
        load_adapter(shorter, tmp_path)
    other_half = copy.deepcopy(other).half()
    with pytest.raises(ValueError, match=r"layers\.0\.query: .*differs.*also after rounding that float32 weight to "
                                         r"float16"):
        load_adapter(other_half, tmp_path)
    assert not qrlora_layers(other_half)
    # A damaged config names the module whose entry lost a field (not a bare KeyError).
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    del meta["modules"]["layers.1.value"]["fingerprint"]
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"layers\.1\.value: .*corrupt: 'fingerprint' is missing"):
        load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("where, key, value, message", [
    (None, "adapter_name", 5, "'adapter_name' is not a string"),
    (None, "include_basis", "false", "'include_basis' is not true or false"),
    (None, "modules", {}, "it lists no adapted modules"),
    ("module", "tau", "0.9", r"layers\.0\.query: .*'tau' is '0\.9', not a number in \(0, 1\] or null"),
    ("module", "tau", float("nan"), r"layers\.0\.query: .*'tau' is nan, not a number in \(0, 1\]"),
    ("module", "tau", 0, r"layers\.0\.query: .*'tau' is 0, not a number in \(0, 1\]"),
    ("module", "energy_captured", [0.9], r"layers\.0\.query: .*'energy_captured' is \[0\.9\], not a number"),
    ("module", "energy_captured", -0.5, r"layers\.0\.query: .*'energy_captured' is -0\.5, not a number finite and >= 0"),
    ("fingerprint", "moment", "1.5", r"layers\.0\.query: .*'fingerprint\.moment' is not a number"),
    ("module", "energy", "bogus", r"layers\.0\.query: .*'energy' is 'bogus', not 'diag' or 'frobenius'"),
    ("fingerprint", "dtype", "bogus", r"layers\.0\.query: .*its fingerprint names an unknown dtype 'bogus'"),
    ("fingerprint", "dtype", "Tensor", r"layers\.0\.query: .*its fingerprint names an unknown dtype 'Tensor'"),
])
def test_damaged_config_fields_name_the_field_and_change_nothing(base, tmp_path, where, key, value, message):
    """Fields the loader reads later (the layer's repr, the rank rule's name, the adapter's name, the fingerprint's
    dtype) are checked with the others, before the model changes."""
    save_adapter(_adapted(base), tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    entry = {None: meta, "module": meta["modules"]["layers.0.query"],
             "fingerprint": meta["modules"]["layers.0.query"]["fingerprint"]}[where]
    entry[key] = value
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh, tmp_path)
    assert not qrlora_layers(fresh) and all(p.requires_grad for p in fresh.parameters())


def test_an_adapter_from_a_diverged_run_is_saved_with_a_warning_and_refused_at_load(base, tmp_path):
    model = _adapted(base)
    with torch.no_grad():
        model.layers[1].value.lam[3] = float("nan")
    with pytest.warns(UserWarning, match=r"lam holds NaN or Inf in 1 module\(s\) \(layers\.1\.value\): training "
                                         r"diverged"):
        save_adapter(model, tmp_path)  # kept to look at
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"layers\.1\.value: lam\[3\] is nan .*diverged"):
        load_adapter(fresh, tmp_path)
    assert not qrlora_layers(fresh)


def _state(model):
    """Everything a failed load must leave as it was."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            [type(m) for m in model.modules()])


def _assert_unchanged(model, before):
    state, grads, types_ = _state(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert grads == before[1] and types_ == before[2]


def _assert_load_refused(base, folder, message):
    """load_adapter of ``folder`` into a copy of ``base`` raises a ValueError matching ``message`` and leaves the
    copy exactly as it was."""
    fresh = copy.deepcopy(base)
    before = _state(fresh)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh, folder)
    _assert_unchanged(fresh, before)


def test_tensors_the_config_does_not_list_are_refused(base, tmp_path):
    """A config that lost a module's entry (or a modules_to_save entry) used to load without that module, its
    tensors ignored: the outputs silently differed from the saved adapter's."""
    save_adapter(_adapted(base), tmp_path)
    saved = (tmp_path / ADAPTER_CONFIG).read_text()
    for drop, message in ((("modules", "layers.1.value"), r"holds 2 tensor\(s\) that adapter_config\.json does not "
                                                          r"list \(layers\.1\.value\.lam, layers\.1\.value\.pivots\)"),
                          (("modules_to_save", "classifier"), r"does not list \(modules_to_save\.classifier\.bias, "
                                                              r"modules_to_save\.classifier\.weight\)")):
        meta = json.loads(saved)
        del meta[drop[0]][drop[1]]
        (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
        _assert_load_refused(base, tmp_path, message + ".*not from one save, or the config was edited")


def test_a_diverged_module_to_save_is_saved_with_a_warning_and_refused_at_load(base, tmp_path):
    model = _adapted(base)
    with torch.no_grad():
        model.classifier.weight[1, 4] = float("nan")
    with pytest.warns(UserWarning, match=r"lam or a modules_to_save parameter holds NaN or Inf in 1 module\(s\) "
                                         r"\(classifier \(modules_to_save\)\)"):
        save_adapter(model, tmp_path)
    _assert_load_refused(base, tmp_path, r"classifier: its modules_to_save parameter 'weight' holds NaN or Inf")


def test_infinite_buffers_of_a_module_to_save_are_kept(base, tmp_path):
    """A buffer may be meant to be infinite (a logit mask of -inf): only parameters count as diverged."""
    model = _adapted(base)
    mask = torch.zeros(2)
    mask[1] = -float("inf")
    model.classifier.register_buffer("mask", mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    fresh.classifier.register_buffer("mask", torch.zeros(2))
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.classifier.mask, mask)


def test_full_rank_adapters_whose_energy_rounds_past_one_load(tmp_path):
    """At full rank energy_captured is 1 up to the weight's rounding (1.0000015 for a bfloat16 768-wide layer): a
    number past 1 there is no corruption."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(768, 8)).to(torch.bfloat16)
    model = copy.deepcopy(base)
    apply_qrlora(model, QRLoraConfig(target_modules=["0"], rank=8), progress=False)
    assert model[0].energy_captured > 1  # the case this test is about
    save_adapter(model, tmp_path)
    load_adapter(base, tmp_path)
    assert base[0].energy_captured == model[0].energy_captured


def _rewrite_module_tensors(folder, name, **replaced):
    """Replace some of a module's stored tensors, with a checksum that matches them (a crafted, not a damaged,
    file)."""
    from safetensors.torch import load_file, save_file
    from qrlora_kernels.adapter_io import _checksum

    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    tensors.update({f"{name}.{key}": value for key, value in replaced.items()})
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "qrlora"})
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
    meta["modules"][name]["checksum"] = _checksum(own)
    meta["modules"][name]["lam_dtype"] = str(own["lam"].dtype).replace("torch.", "")
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))


@pytest.mark.parametrize("case", ["lam past float32", "float pivots"])
def test_stored_values_that_cannot_be_honoured_are_refused(base, tmp_path, case):
    """float64 coefficients that overflow the layer's float32 lam (they loaded as inf), and pivots stored as floats
    (truncated to other columns, silently): refused, naming the module, before anything changes."""
    save_adapter(_adapted(base), tmp_path)
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    if case == "lam past float32":
        lam = stored["layers.0.query.lam"].double()
        lam[2] = 1e300
        _rewrite_module_tensors(tmp_path, "layers.0.query", lam=lam)
        message = r"layers\.0\.query: lam\[2\] = 1e\+300 overflows the layer's torch\.float32"
    else:
        _rewrite_module_tensors(tmp_path, "layers.0.query", pivots=stored["layers.0.query.pivots"].float() + 0.9)
        message = r"layers\.0\.query: its pivots are stored as torch\.float32, not as integers"
    _assert_load_refused(base, tmp_path, message)


@pytest.mark.parametrize("damage", ["nested config", "long integer in config", "nested safetensors header"])
def test_json_past_the_parser_limits_is_named_as_a_corrupt_file(base, tmp_path, damage):
    """Arrays nested too deep (RecursionError) and integers past Python's digit limit escaped as bare errors."""
    save_adapter(_adapted(base), tmp_path)
    if damage == "nested config":
        (tmp_path / ADAPTER_CONFIG).write_text("[" * 100_000 + "]" * 100_000)
        message = r"adapter_config\.json is truncated or corrupt: RecursionError"
    elif damage == "long integer in config":
        text = (tmp_path / ADAPTER_CONFIG).read_text()
        (tmp_path / ADAPTER_CONFIG).write_text(text.replace('"rank": ', '"rank": ' + "1" * 5000, 1))
        message = r"adapter_config\.json is truncated or corrupt: ValueError: Exceeds the limit"
    else:
        header = b"[" * 100_000 + b"]" * 100_000
        (tmp_path / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header)
        message = r"adapter\.safetensors is truncated or corrupt \(its header is unreadable"
    _assert_load_refused(base, tmp_path, message)


def test_an_include_basis_file_whose_basis_has_another_rank_is_refused_before_anything_changes(base, tmp_path):
    from safetensors.torch import load_file, save_file
    from qrlora_kernels.adapter_io import _checksum
    save_adapter(_adapted(base), tmp_path, include_basis=True)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    name = "layers.2.value"  # the last module: every other one would already be converted
    good = load_file(tmp_path / ADAPTER_WEIGHTS)
    r = meta["modules"][name]["rank"]
    for cut in ("Q", "R"):
        tensors = dict(good)
        tensors[f"{name}.{cut}"] = (good[f"{name}.Q"][:, :r - 2] if cut == "Q" else good[f"{name}.R"][:r - 2]).clone()
        meta["modules"][name]["checksum"] = _checksum({k: tensors[f"{name}.{k}"] for k in ("lam", "pivots", "Q", "R")})
        save_file(tensors, tmp_path / ADAPTER_WEIGHTS, metadata={"format": "qrlora-adapter"})
        (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
        fresh = copy.deepcopy(base)
        with pytest.raises(ValueError, match=rf"{name}: its stored basis {cut} is .* expected a floating-point "
                                             rf"\({32 if cut == 'Q' else r}, {r if cut == 'Q' else 32}\)"):
            load_adapter(fresh, tmp_path)
        assert not qrlora_layers(fresh) and all(p.requires_grad for p in fresh.parameters())


def test_a_merged_layer_the_adapter_does_not_cover_is_refused_before_any_lam_changes(base, tmp_path):
    """Loading touches every layer's lam (a new row, or the overwritten row cleared where the file has no
    coefficients); a merged layer holds its lam in its weight, so it is refused first, by name."""
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["query"])), tmp_path / "query-only")
    model = _adapted(base, QRLoraConfig(target_modules=["query", "value"]))  # no head: no other rule refuses first
    model.layers[2].value.merge()
    lams = {name: (layer.lam, layer.lam.detach().clone()) for name, layer in qrlora_layers(model)}
    for name in ("other", "default"):  # a new row, and an overwrite that clears the value layers' rows
        with pytest.raises(ValueError, match=r"layers\.2\.value: layer is merged; unmerge\(\) it"):
            load_adapter(model, tmp_path / "query-only", adapter_name=name)
        for layer_name, layer in qrlora_layers(model):
            assert layer.lam is lams[layer_name][0] and torch.equal(layer.lam, lams[layer_name][1]), layer_name
        assert model.qrlora_adapter_ids == {"default": 0}


def test_dtype_mismatch_is_honoured_when_the_weights_round_to_the_saved_ones(tmp_path):
    base = TinyModel().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.half().float())  # weights that fp16 represents exactly
    model = _adapted(base)
    save_adapter(model, tmp_path)
    half = copy.deepcopy(base).half()
    load_adapter(half, tmp_path)
    for name, layer in qrlora_layers(half):
        assert layer.weight.dtype == torch.float16
        assert_rel_close(layer.lam, model.get_submodule(name).lam, 0.0, name=f"{name}.lam")


def test_a_config_this_version_cannot_read_leaves_the_model_untouched(base, tmp_path):
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["query", "value"])), tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert "task_type" not in meta["config"]  # unset new fields are not written: older versions read the file
    meta["config"]["qr_method"] = "householder"  # e.g. a newer version's method
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="config cannot be read by this version.*qr_method"):
        load_adapter(fresh, tmp_path)
    assert not qrlora_layers(fresh) and all(p.requires_grad for p in fresh.parameters())
    meta["config"]["qr_method"] = "geqp3"
    meta["modules"]["layers.0.query"]["fingerprint"]["rounded"]["bfloat16"].pop("sum")
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"layers\.0\.query: .*corrupt: 'fingerprint.rounded' is damaged"):
        load_adapter(fresh, tmp_path)


def test_an_adapter_on_a_multihead_attention_out_proj_is_refused(tmp_path):
    """Older versions let apply_qrlora adapt it: its lam was ignored by the forward but applied by a merge."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(HIDDEN, 4, batch_first=True)
    wrapper = nn.Module()
    wrapper.attn = attention
    layer = QRLoraLinear.from_linear(attention.out_proj, rank=4)
    save_model = copy.deepcopy(wrapper)
    save_model.attn.out_proj = layer
    save_model.qrlora_adapter_ids = {"default": 0}
    save_adapter(save_model, tmp_path)
    with pytest.raises(ValueError, match="attn.out_proj is the out_proj of an nn.MultiheadAttention"):
        load_adapter(copy.deepcopy(wrapper), tmp_path)


def test_writes_through_a_symbolic_link(base, tmp_path):
    """As open() does (Hugging Face's cache links its files): the link stays, its target gets the data."""
    target = tmp_path / "blobs" / "config"
    target.parent.mkdir()
    target.write_text("old")
    (tmp_path / "snapshot").mkdir()
    link = tmp_path / "snapshot" / ADAPTER_CONFIG
    link.symlink_to(target)
    save_adapter(_adapted(base), tmp_path / "snapshot")
    assert link.is_symlink() and json.loads(target.read_text())["format"] == "qrlora-adapter"


@pytest.mark.parametrize("include_basis", [False, True])
def test_float32_adapter_loads_onto_the_same_base_in_half_precision(base, tmp_path, include_basis):
    """The usual serving set-up (PEFT does it too): trained on a float32 base, served on it in bf16/fp16."""
    model = _adapted(base)
    save_adapter(model, tmp_path, include_basis=include_basis)
    x = torch.randn(3, 4, HIDDEN)
    expected = model.double()(x.double())
    for dtype, band in ((torch.float16, 1e-2), (torch.bfloat16, 4e-2)):
        served = copy.deepcopy(base).to(dtype)
        load_adapter(served, tmp_path)
        for name, layer in qrlora_layers(served):
            assert layer.weight.dtype == layer.Q.dtype == dtype
            assert_rel_close(layer.lam, model.get_submodule(name).lam, 0.0, name=f"{name}.lam")
        assert_rel_close(served(x.to(dtype)), expected, band, name=f"adapter served in {dtype}")
        assert rel_error(copy.deepcopy(base).to(dtype)(x.to(dtype)), expected) > 4 * band  # the adapter shows
    # A float16 adapter has no bfloat16 rounding to compare with: that mismatch cannot be honoured.
    half_model = _adapted(copy.deepcopy(base).half())
    save_adapter(half_model, tmp_path / "fp16")
    with pytest.raises(ValueError, match=r"dtype mismatch that cannot be honoured.*float16.*bfloat16"):
        load_adapter(copy.deepcopy(base).half().bfloat16(), tmp_path / "fp16")


def test_overwriting_an_adapter_replaces_it_whole(base, tmp_path):
    both = _adapted(base, QRLoraConfig(target_modules=["query", "value"]))
    query_only = _adapted(base, QRLoraConfig(target_modules=["query"]))
    save_adapter(query_only, tmp_path)
    load_adapter(both, tmp_path)  # over "default": value layers must lose the old adapter's coefficients
    x = torch.randn(2, 5, HIDDEN)
    assert_rel_close(both(x), query_only(x), 1e-5, name="overwritten adapter")
    for i in range(3):
        assert torch.count_nonzero(both.layers[i].value.lam) == 0


def test_wrapped_models_save_under_the_plain_names(base, tmp_path):
    """DataParallel / DDP / torch.compile prefix module names; the adapter must still load into a plain base."""
    model = _adapted(base, CONFIG)
    x = torch.randn(2, 3, HIDDEN)
    expected = model(x)
    for label, wrapped in (("data_parallel", nn.DataParallel(model)), ("compiled", torch.compile(model))):
        save_adapter(wrapped, tmp_path / label)
        meta = json.loads((tmp_path / label / ADAPTER_CONFIG).read_text())
        assert set(meta["modules"]) == {n for n, _ in qrlora_layers(model)}
        assert list(meta["modules_to_save"]) == ["classifier"]
        fresh = copy.deepcopy(base)
        load_adapter(fresh, tmp_path / label)
        assert_rel_close(fresh(x), expected, 1e-5, name=f"reloaded from {label}")
    # Loading goes through the wrapper too.
    wrapped_fresh = nn.DataParallel(copy.deepcopy(base))
    load_adapter(wrapped_fresh, tmp_path / "compiled")
    assert_rel_close(wrapped_fresh(x), expected, 1e-5, name="loaded into a wrapped base")


def test_wrappers_inside_the_model_do_not_change_the_saved_names(base, tmp_path):
    """Per-block torch.compile and activation-checkpoint wrappers insert path parts; files name the plain modules."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    x = torch.randn(2, 3, HIDDEN)
    for label, wrap in (("compiled", lambda block: torch.compile(block, backend="eager")),
                        ("checkpointed", checkpoint_wrapper)):
        model = _adapted(base, CONFIG)
        expected = model(x)
        for i in range(len(model.layers)):
            model.layers[i] = wrap(model.layers[i])
        save_adapter(model, tmp_path / label)
        meta = json.loads((tmp_path / label / ADAPTER_CONFIG).read_text())
        assert sorted(meta["modules"]) == sorted(f"layers.{i}.{p}" for i in range(3) for p in ("query", "value"))
        plain = copy.deepcopy(base)
        load_adapter(plain, tmp_path / label)
        assert_rel_close(plain(x), expected, 1e-5, name=f"saved from {label} blocks")
        wrapped_base = copy.deepcopy(base)  # and loaded into a model whose blocks are wrapped the same way
        for i in range(len(wrapped_base.layers)):
            wrapped_base.layers[i] = wrap(wrapped_base.layers[i])
        load_adapter(wrapped_base, tmp_path / label)
        assert_rel_close(wrapped_base(x), expected, 1e-5, name=f"loaded into {label} blocks")
        single = copy.deepcopy(base)  # a wrapped Linear itself: the adapter goes inside the wrapper
        single.layers[0].query = wrap(single.layers[0].query)
        load_adapter(single, tmp_path / label)
        assert_rel_close(single(x), expected, 1e-5, name=f"loaded into {label} Linear layers")


def test_a_non_fitting_module_to_save_is_refused_before_any_change(base, tmp_path):
    save_adapter(_adapted(base, CONFIG), tmp_path)
    three_labels = copy.deepcopy(base)
    three_labels.classifier = nn.Linear(HIDDEN, 3)
    with pytest.raises(ValueError, match=r"classifier: .*do not fit.*weight: model \(3, 32\), adapter \(2, 32\)"):
        load_adapter(three_labels, tmp_path)
    assert not qrlora_layers(three_labels) and not hasattr(three_labels, "qrlora_adapter_ids")
    assert all(p.requires_grad for p in three_labels.parameters())


def test_the_only_adapter_saves_without_naming_it(base, tmp_path):
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["query", "value"])), tmp_path / "a")
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "a", adapter_name="sst2")
    save_adapter(model, tmp_path / "b")  # "default" is not loaded, but "sst2" is the only adapter
    assert json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())["adapter_name"] == "sst2"
    load_adapter(model, tmp_path / "a", adapter_name="mnli")
    save_adapter(model, tmp_path / "c")  # several: the one the model computes with, the first loaded
    assert json.loads((tmp_path / "c" / ADAPTER_CONFIG).read_text())["adapter_name"] == "sst2"
    from qrlora_kernels import merge_and_unload, set_adapter
    set_adapter(model, "mnli")
    save_adapter(model, tmp_path / "d")
    assert json.loads((tmp_path / "d" / ADAPTER_CONFIG).read_text())["adapter_name"] == "mnli"
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        expected = model(x)
        assert_rel_close(merge_and_unload(model)(x), expected, 1e-5, name="merged without a name: mnli")


def _tensor_span(path, key):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def test_truncated_and_corrupt_files(base, tmp_path):
    model = _adapted(base)
    save_adapter(model, tmp_path)
    weights = tmp_path / ADAPTER_WEIGHTS
    good = weights.read_bytes()
    # A flipped byte inside one module's lam: the checksum names that module.
    start, _ = _tensor_span(weights, "layers.1.query.lam")
    weights.write_bytes(good[:start] + bytes([good[start] ^ 0xFF]) + good[start + 1:])
    with pytest.raises(ValueError, match=r"layers\.1\.query: its stored tensors do not match their checksum"):
        load_adapter(copy.deepcopy(base), tmp_path)
    # Truncated: the header survives, so the modules whose data is gone are named.
    start, _ = _tensor_span(tmp_path / ADAPTER_WEIGHTS, "layers.2.value.pivots")
    weights.write_bytes(good[:start + 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt \(data missing for module\(s\) .*layers\.2\.value"):
        load_adapter(copy.deepcopy(base), tmp_path)
    weights.write_bytes(good[:5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(copy.deepcopy(base), tmp_path)
    # A header that is JSON but not a safetensors header: still the file's error (the diagnosis itself survives it).
    for header in ([1, 2], {"layers.0.query.lam": {"dtype": "F32"}}, {"x": {"data_offsets": "ab"}}):
        data = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(data)) + data)
        with pytest.raises(ValueError, match=r"truncated or corrupt \(its header is not a safetensors header"):
            load_adapter(copy.deepcopy(base), tmp_path)
    weights.write_bytes(good)
    (tmp_path / ADAPTER_CONFIG).write_text('{"format": "qrlora-adapter", "modu')
    with pytest.raises(ValueError, match="adapter_config.json is truncated or corrupt"):
        load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing: no such adapter folder"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in .*empty"):
        load_adapter(copy.deepcopy(base), tmp_path / "empty")


def test_a_peft_adapter_folder_is_named_as_such(base, tmp_path):
    """PEFT's adapters use the same file name, adapter_config.json: load_adapter says the folder holds a PEFT
    adapter and what reads it, and leaves the model as it was."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    lora.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_CONFIG).is_file()
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="is a PEFT adapter config \\(peft_type 'LORA'\\), not a QR-LoRA one: "
                                         "load it with peft.PeftModel.from_pretrained"):
        load_adapter(model, tmp_path)
    assert not qrlora_layers(model) and all(torch.equal(a, b) for a, b in
                                            zip(model.state_dict().values(), base.state_dict().values()))


def test_save_errors(base, tmp_path):
    with pytest.raises(ValueError, match="no QR-LoRA layers to save"):
        save_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(ValueError, match="unknown adapter 'sst2'"):
        save_adapter(_adapted(base), tmp_path, adapter_name="sst2")


def test_named_adapters_share_the_basis_in_one_mixed_batch(base, tmp_path):
    per_task = {task: _adapted(base, QRLoraConfig(target_modules=["query", "value"])) for task in ("sst2", "mnli")}
    # A lower tau on the same weights: its pivots are the leading part of the others', so it shares their basis.
    per_task["small"] = _adapted(base, QRLoraConfig(target_modules=["query", "value"], tau=0.5))
    for task, m in per_task.items():
        save_adapter(m, tmp_path / task)
    model = copy.deepcopy(base)
    assert load_adapter(model, tmp_path / "sst2", adapter_name="sst2") == {"sst2": 0}
    assert load_adapter(model, tmp_path / "mnli", adapter_name="mnli") == {"sst2": 0, "mnli": 1}
    assert load_adapter(model, tmp_path / "small", adapter_name="small") == {"sst2": 0, "mnli": 1, "small": 2}
    assert all(layer.lam.shape[0] == 3 for _, layer in qrlora_layers(model))
    x = torch.randn(4, 6, HIDDEN)
    order = ["mnli", "small", "sst2", "mnli"]
    with adapter_batch(model, order):
        mixed = model(x)
    for i, task in enumerate(order):
        assert_rel_close(mixed[i], per_task[task](x[i:i + 1])[0], 1e-5, name=f"sequence {i} ({task})")
    # One adapter of a multi-adapter model saves on its own and reloads alone.
    save_adapter(model, tmp_path / "mnli_again", adapter_name="mnli")
    alone = copy.deepcopy(base)
    load_adapter(alone, tmp_path / "mnli_again")
    assert_rel_close(alone(x), per_task["mnli"](x), 1e-5, name="mnli saved from the multi-adapter model")
    # Reloading a known name overwrites it; a larger basis than the model's cannot be shared.
    assert load_adapter(model, tmp_path / "sst2", adapter_name="mnli") == {"sst2": 0, "mnli": 1, "small": 2}
    narrow = copy.deepcopy(base)
    load_adapter(narrow, tmp_path / "small")
    with pytest.raises(ValueError, match=r"layers\.0\.query: the adapter's basis .* is not the leading part"):
        load_adapter(narrow, tmp_path / "sst2", adapter_name="sst2")


def test_modules_to_save_round_trip(base, tmp_path):
    """(Several adapters with their own copies: tests/test_modules_to_save.py.)"""
    model = _adapted(base, CONFIG)
    save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert fresh.classifier.weight.requires_grad and fresh.qrlora_modules_to_save.names() == ["classifier"]
    assert isinstance(fresh.layers[0].query, QRLoraLinear)


@pytest.mark.gpu
def test_adapter_saved_on_gpu_loads_on_cpu(base, tmp_path):
    # Fingerprints are byte samples and float64 sums, so they do not depend on the device.
    model = _adapted(base).cuda()
    apply_device_x = torch.randn(2, 4, HIDDEN)
    expected = model(apply_device_x.cuda()).cpu()
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    assert_rel_close(fresh(apply_device_x), expected, 5e-4, name="GPU-saved adapter on CPU (tf32 band)")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_adapter_files_get_the_permissions_open_would_give(base, tmp_path, umask):
    """Not mkstemp's 0o600: a saved adapter is readable by whoever could read a file saved with open()."""
    model = _adapted(base)
    old = os.umask(umask)
    try:
        save_adapter(model, tmp_path / "new")
        with open(tmp_path / "reference", "wb"):
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        assert stat.S_IMODE((tmp_path / "new" / name).stat().st_mode) == expected
    # Overwriting keeps a mode the user chose.
    os.chmod(tmp_path / "new" / ADAPTER_WEIGHTS, 0o640)
    save_adapter(model, tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new" / ADAPTER_WEIGHTS).stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG])


# ------------------------------------------------------------------------------------ the Hugging Face Hub
def test_push_to_and_load_from_the_hub(base, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from qrlora_kernels import push_adapter_to_hub
    hub = FakeHub(tmp_path, monkeypatch)
    model = _adapted(base)
    model.config = types.SimpleNamespace(_name_or_path="me/tiny-base")  # as a transformers model has
    h = torch.randn(4, 5, HIDDEN)
    with torch.no_grad():
        expected = model(h)
    assert push_adapter_to_hub(model, "me/tiny-qrlora", private=True, token="hf_x") == "commit:me/tiny-qrlora@main"
    assert hub.calls[:2] == [("create_repo", "me/tiny-qrlora", True, "hf_x"),
                             ("upload_folder", "me/tiny-qrlora", None, "Upload QR-LoRA adapter")]
    files = hub.repos["me/tiny-qrlora"]["main"]
    assert set(files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"}
    assert json.loads(files[ADAPTER_CONFIG])["base_model_name_or_path"] == "me/tiny-base"
    card = files["README.md"].decode()
    ranks = [layer.rank for _, layer in qrlora_layers(model)]
    assert card.startswith("---\n") and "base_model: me/tiny-base" in card and "library_name: qrlora-kernels" in card
    assert f"{sum(ranks)} trainable\ncoefficients over {len(ranks)} adapted modules" in card
    assert "fully trained classifier" in card and 'load_adapter(model, "me/tiny-qrlora")' in card
    assert "the TinyModel it was made on" in card and "from transformers" not in card
    files["README.md"] = b"my own card"

    fresh = copy.deepcopy(base)
    load_adapter(fresh, "me/tiny-qrlora", token="hf_x")
    assert hub.calls[-1] == ("snapshot_download", "me/tiny-qrlora", None, "hf_x")
    with torch.no_grad():
        assert_rel_close(fresh(h), expected, 1e-5, name="adapter loaded from the Hub")

    push_adapter_to_hub(_adapted(base, scale=0.1), "tiny-bare")  # the Hub puts a bare name under the user's
    assert hub.calls[-1][:2] == ("upload_folder", "me/tiny-bare")
    assert 'load_adapter(model, "me/tiny-bare")' in hub.repos["me/tiny-bare"]["main"]["README.md"].decode()

    push_adapter_to_hub(_adapted(base, scale=0.1), "me/tiny-qrlora", revision="v2")
    assert ("create_branch", "me/tiny-qrlora", "v2") in hub.calls
    assert hub.repos["me/tiny-qrlora"]["v2"]["README.md"] == b"my own card"  # a card of the user's is kept
    other = copy.deepcopy(base)
    load_adapter(other, "me/tiny-qrlora", revision="v2")
    with torch.no_grad():
        assert rel_error(other(h), expected) > 1e-3  # another version of the adapter


def test_hub_lookups_that_fail_are_named(base, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    hub = FakeHub(tmp_path, monkeypatch)
    model = copy.deepcopy(base)
    with pytest.raises(FileNotFoundError, match=r"me/missing: not a local folder, and not found on the Hugging "
                                                r"Face Hub \(RepositoryNotFound: 404"):
        load_adapter(model, "me/missing")
    hub.repos["me/weights-only"] = {"main": {ADAPTER_WEIGHTS: b"x"}}
    # (Online, huggingface_hub falls back to a partial cache without an error when the Hub is unreachable: the
    # message says that too.)
    with pytest.raises(FileNotFoundError, match=r"Hub repository me/weights-only has no adapter_config.json: it "
                                                r"does not hold a QR-LoRA adapter .*, or the Hub could not be "
                                                r"reached and the local cache holds only part of it"):
        load_adapter(model, "me/weights-only")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # offline, the cache may be partial
    with pytest.raises(FileNotFoundError, match=r"me/weights-only: adapter_config.json not in the local cache, and "
                                                r"HF_HUB_OFFLINE is set"):
        load_adapter(model, "me/weights-only")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Not a possible repository id either (absolute, or more than one '/'): no Hub lookup at all.
    calls = len(hub.calls)
    for missing in (tmp_path / "nowhere", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=r": no such adapter folder$"):
            load_adapter(model, missing)
    assert len(hub.calls) == calls
    save_adapter(_adapted(base), tmp_path / "local")
    with pytest.raises(ValueError, match=r"revision='v2' selects a version of a Hub repository, but .* local path"):
        load_adapter(model, tmp_path / "local", revision="v2")
    assert not any(isinstance(m, QRLoraLinear) for m in model.modules())  # untouched by any of it


def test_an_uncached_repository_offline_is_named(base, tmp_path, monkeypatch):
    """The real huggingface_hub, offline, with an empty cache: the error says what was looked for."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"me/not-cached: not a local folder, and not found on the Hugging "
                                                r"Face Hub at revision 'main' \(\w+"):
        load_adapter(copy.deepcopy(base), "me/not-cached", revision="main")


@pytest.mark.parametrize("include_basis", [False, True])
def test_store_r_false_adapters_round_trip_as_q_only_layers(base, tmp_path, include_basis):
    model = _adapted(base, dataclasses.replace(CONFIG, store_r=False))
    x = torch.randn(3, 4, HIDDEN)
    expected = model(x)
    save_adapter(model, tmp_path, include_basis=include_basis)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["config"]["store_r"] is False
    assert all(info["store_r"] is False for info in meta["modules"].values())
    from safetensors.torch import load_file
    stored = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert not any(k.endswith(".R") for k in stored)
    assert sum(k.endswith(".Q") for k in stored) == (6 if include_basis else 0)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    assert all(layer.R is None for _, layer in qrlora_layers(fresh)) and len(qrlora_layers(fresh)) == 6
    if include_basis:
        assert torch.equal(fresh(x), expected)
    else:
        assert_rel_close(fresh(x), expected, 1e-5, name="reloaded output")

    name = next(iter(meta["modules"]))
    meta["modules"][name]["store_r"] = "yes"
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{name}: .* is corrupt: 'store_r' is not true or false"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_load_adapter_store_r_chooses_the_kind_of_layer(base, tmp_path):
    """load_adapter(store_r=False) serves an adapter trained with R on Q-only layers (and store_r=True the
    reverse, forming R = Q^T W0 from a Q-only include_basis file): the same outputs to rounding."""
    model = _adapted(base)
    x = torch.randn(3, 4, HIDDEN)
    expected = model(x)
    save_adapter(model, tmp_path / "full")
    half = copy.deepcopy(base)
    load_adapter(half, tmp_path / "full", store_r=False)
    assert all(layer.R is None for _, layer in qrlora_layers(half)) and len(qrlora_layers(half)) == 6
    from qrlora_kernels.model import CONFIG_ATTR
    assert getattr(half, CONFIG_ATTR).store_r is False
    assert_rel_close(half(x), expected, 1e-5, name="Q-only layers from an adapter trained with R")
    save_adapter(half, tmp_path / "q", include_basis=True)
    full = copy.deepcopy(base)
    load_adapter(full, tmp_path / "q", store_r=True)
    for name, layer in qrlora_layers(full):
        assert_rel_close(layer.R, model.get_submodule(name).R, 1e-5, name=f"{name}.R from Q^T W0")
    assert_rel_close(full(x), expected, 1e-5, name="layers with R from a Q-only file")
    with pytest.raises(TypeError, match="store_r must be True, False or None, got 'no'"):
        load_adapter(copy.deepcopy(base), tmp_path / "full", store_r="no")


def test_set_adapter_picks_the_adapter_outside_adapter_batch_and_for_saves_and_merges(base, tmp_path):
    """PEFT's set_adapter: the model computes with the chosen adapter, training reaches only its row, and
    save_adapter / merge_and_unload take it when no name is given."""
    from qrlora_kernels import merge_and_unload, set_adapter
    config = QRLoraConfig(target_modules=["query", "value"])
    tuned = {name: _adapted(base, config) for name in ("a", "b")}
    for name, model in tuned.items():
        save_adapter(model, tmp_path / name)
    served = copy.deepcopy(base)
    for name in ("a", "b"):
        load_adapter(served, tmp_path / name, adapter_name=name)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        assert_rel_close(served(x), tuned["a"](x), 1e-5, name="before set_adapter: the first loaded")
        set_adapter(served, "b")
        assert_rel_close(served(x), tuned["b"](x), 1e-5, name="set_adapter('b')")
        assert rel_error(served(x), tuned["a"](x)) > 1e-2
    rows = {name: layer.lam.detach().clone() for name, layer in qrlora_layers(served)}
    optimizer = torch.optim.SGD([p for p in served.parameters() if p.requires_grad], lr=0.1)
    served(x).square().sum().backward()
    optimizer.step()
    for name, layer in qrlora_layers(served):
        assert torch.equal(layer.lam[0], rows[name][0]), f"{name}: adapter 'a' changed while 'b' trained"
        assert not torch.equal(layer.lam[1], rows[name][1]), f"{name}: adapter 'b' did not train"
    save_adapter(served, tmp_path / "saved")  # no name: the active adapter
    assert json.loads((tmp_path / "saved" / ADAPTER_CONFIG).read_text())["adapter_name"] == "b"
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "saved")
    merged = merge_and_unload(copy.deepcopy(served))  # no name: the active adapter
    with torch.no_grad():
        assert_rel_close(reloaded(x), served(x), 1e-5, name="the active adapter, saved and reloaded")
        assert_rel_close(merged(x), served(x), 1e-5, name="the active adapter, merged")
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; loaded adapters: \['a', 'b'\]"):
        set_adapter(served, "c")
    with pytest.raises(TypeError, match="adapter_name must be an adapter's name"):
        set_adapter(served, 0)
    with pytest.raises(ValueError, match="no QR-LoRA layers"):
        set_adapter(copy.deepcopy(base), "a")


def test_layers_a_reload_builds_compute_with_the_active_adapter(base, tmp_path):
    """set_adapter('b'), then a new version of 'b' that adapts more modules: the layers built for it start on
    the active adapter's row (they computed with 'a' and trained its row, silently)."""
    from qrlora_kernels import set_adapter
    query_only = QRLoraConfig(target_modules=["query"], rank=4)
    both = QRLoraConfig(target_modules=["query", "value"], rank=4)
    for name, config in (("a", query_only), ("b0", query_only), ("b", both)):
        save_adapter(_adapted(base, config), tmp_path / name)
    served = copy.deepcopy(base)
    load_adapter(served, tmp_path / "a", adapter_name="a")
    load_adapter(served, tmp_path / "b0", adapter_name="b")
    set_adapter(served, "b")
    load_adapter(served, tmp_path / "b", adapter_name="b")
    alone = copy.deepcopy(base)
    load_adapter(alone, tmp_path / "b")
    assert {layer.active_adapter for _, layer in qrlora_layers(served)} == {1}
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        assert_rel_close(served(x), alone(x), 1e-5, name="the active adapter after its reload")


def test_resaving_the_adapter_apply_qrlora_made_keeps_its_own_modules(base, tmp_path):
    """apply_qrlora recorded nothing about its adapter, so after another adapter added layers save_adapter wrote
    those layers too (at the layer's rank, lam 0): the file no longer loaded beside adapters of a wider basis
    there."""
    trained = _adapted(base, QRLoraConfig(target_modules=["query"], rank=4))
    save_adapter(trained, tmp_path / "before")
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["value"], rank=2)), tmp_path / "value2")
    load_adapter(trained, tmp_path / "value2", adapter_name="other")
    save_adapter(trained, tmp_path / "after", adapter_name="default")
    before, after = (json.loads((tmp_path / d / ADAPTER_CONFIG).read_text()) for d in ("before", "after"))
    assert sorted(after["modules"]) == sorted(before["modules"]) == [f"layers.{i}.query" for i in range(3)]
    assert after["modules"] == before["modules"] and after["config"] == before["config"]
    assert (tmp_path / "after" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "before" / ADAPTER_WEIGHTS).read_bytes()
    save_adapter(_adapted(base, QRLoraConfig(target_modules=["value"], rank=4)), tmp_path / "value4")
    served = copy.deepcopy(base)
    load_adapter(served, tmp_path / "after")
    load_adapter(served, tmp_path / "value4", adapter_name="wider")  # refused when "after" held rank-2 values


def test_model_level_functions_refuse_a_bare_layer(tmp_path):
    """A bare layer has no submodule to replace: save_adapter named its module '', load_adapter added a child
    named '' to an nn.Linear, merge_and_unload returned the layer unmerged."""
    from qrlora_kernels import merge_and_unload
    layer = QRLoraLinear.from_linear(nn.Linear(HIDDEN, HIDDEN), rank=4)
    calls = {"apply_qrlora": lambda: apply_qrlora(nn.Linear(HIDDEN, HIDDEN), QRLoraConfig(target_modules="all-linear")),
             "save_adapter": lambda: save_adapter(layer, tmp_path / "bare"),
             "merge_and_unload": lambda: merge_and_unload(layer)}
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name} works on a model that holds linear layers, not on a "
                                            f"(Linear|QRLoraLinear) itself: wrap the layer"):
            call()
    save_adapter(nn.Sequential(layer), tmp_path / "wrapped")
    with pytest.raises(TypeError, match="load_adapter works on a model that holds linear layers, not on a Linear"):
        load_adapter(nn.Linear(HIDDEN, HIDDEN), tmp_path / "wrapped")
    assert not (tmp_path / "bare").exists() and not layer.merged


def test_an_adapter_saved_again_keeps_its_own_modules_ranks_and_config(base, tmp_path):
    """'b' (query only, rank 3, tau-less) loaded beside 'a' (query and value, rank 6) and saved again: the file
    keeps b's modules, ranks and config, not the layers' (zero-padded to rank 6, value added, a's config), so it
    loads beside the original b; coefficients trained since beyond its rank or in the value layers are kept."""
    from qrlora_kernels import set_adapter
    config_a = QRLoraConfig(target_modules=["query", "value"], rank=6)
    config_b = QRLoraConfig(target_modules=["query"], rank=3, energy="frobenius")
    save_adapter(_adapted(base, config_a), tmp_path / "a")
    save_adapter(_adapted(base, config_b), tmp_path / "b")
    served = copy.deepcopy(base)
    load_adapter(served, tmp_path / "a", adapter_name="a")
    load_adapter(served, tmp_path / "b", adapter_name="b")
    save_adapter(served, tmp_path / "b_again", adapter_name="b")
    original = json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())
    again = json.loads((tmp_path / "b_again" / ADAPTER_CONFIG).read_text())
    assert {k: v["rank"] for k, v in again["modules"].items()} == {f"layers.{i}.query": 3 for i in range(3)}
    assert again["config"] == original["config"] and again["modules"] == original["modules"]
    load_adapter(served, tmp_path / "b_again", adapter_name="b_copy")  # beside the original
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad(), adapter_batch(served, ["b", "b_copy"]):
        out = served(x[:1].expand(2, -1, -1))  # one sequence under each
    assert_rel_close(out[1], out[0], 1e-6, name="b saved again, beside b")
    # Training b on the server reaches the layers' full rank and the value layers too: all of it is saved.
    set_adapter(served, "b")
    with torch.no_grad():
        served.layers[0].query.lam[1, 4] = 0.5
        served.layers[2].value.lam[1, 1] = -0.25
        expected = served(x)
    save_adapter(served, tmp_path / "b_trained", adapter_name="b")
    trained = json.loads((tmp_path / "b_trained" / ADAPTER_CONFIG).read_text())["modules"]
    assert {k: v["rank"] for k, v in trained.items()} == {"layers.0.query": 5, "layers.1.query": 3,
                                                          "layers.2.query": 3, "layers.2.value": 2}
    assert trained["layers.0.query"]["tau"] is None
    assert trained["layers.1.query"] == original["modules"]["layers.1.query"]
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "b_trained")
    with torch.no_grad():
        assert_rel_close(fresh(x), expected, 1e-5, name="b trained on the server, saved and reloaded")


def test_unload_gives_the_base_layers_back_without_any_update(base, tmp_path):
    """PEFT's unload: every layer back to the one it replaced, W0 and bias the same tensors (W0 recovered where
    merged, a Conv1D where it was one), the bookkeeping and the checkpointing hook gone; a layer whose W0 cannot
    be recovered is refused before any layer changes; the trained head keeps its values (trained in place)."""
    from transformers.pytorch_utils import Conv1D
    from qrlora_kernels import unload
    from qrlora_kernels.reentrant_checkpointing import InputsRequireGrad
    torch.manual_seed(0)
    base.layers[1].value = Conv1D(HIDDEN, HIDDEN)  # GPT-2's layout for one of them
    model = _adapted(base, dataclasses.replace(CONFIG, store_r=False))
    model.layers[2].query.merge()
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        model.layers[1].query.merge()
        model.layers[1].query.lam.fill_(-1.0)  # merged with 1 + lam = 0: W0 is gone from that layer
    before = {n: m for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"layers\.1\.query: cannot recover W0"):
        unload(model)
    assert {n: m for n, m in model.named_modules()} == before
    model = _adapted(base, CONFIG)
    model.layers[2].query.merge()
    head = model.classifier.weight.detach().clone()
    w0 = model.layers[0].query.weight
    unload(model)
    assert type(model.layers[0].query) is nn.Linear and type(model.layers[1].value) is Conv1D
    assert model.layers[0].query.weight is not None and model.layers[0].query.weight.data_ptr() == w0.data_ptr()
    assert not any(hasattr(model, a) for a in ("qrlora_adapter_ids", "qrlora_config", "qrlora_modules_to_save"))
    assert not [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, InputsRequireGrad)]
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain.classifier.weight.copy_(head)
        plain.classifier.bias.copy_(model.classifier.bias)
        assert_rel_close(model(x), plain(x), 1e-5, name="unloaded = base with the trained head")
    assert torch.equal(model.classifier.weight, head)
    with pytest.raises(ValueError, match="no QR-LoRA layers to unload"):
        unload(model)


def test_delete_adapter_removes_its_row_and_keeps_the_others(base, tmp_path):
    from qrlora_kernels import delete_adapter, set_adapter
    config = QRLoraConfig(target_modules=["query", "value"], rank=4)
    tuned = {name: _adapted(base, config) for name in ("a", "b", "c")}
    for name, model in tuned.items():
        save_adapter(model, tmp_path / name)
    served = copy.deepcopy(base)
    for name in ("a", "b", "c"):
        load_adapter(served, tmp_path / name, adapter_name=name)
    x = torch.randn(3, 5, HIDDEN)
    lam = served.layers[0].query.lam
    set_adapter(served, "b")
    delete_adapter(served, "a")
    assert served.qrlora_adapter_ids == {"b": 0, "c": 1} and served.layers[0].query.lam is lam
    with torch.no_grad():
        assert_rel_close(served(x), tuned["b"](x), 1e-5, name="b stays active")
        with adapter_batch(served, ["c", "b", "c"]):
            mixed = served(x)
        for i, name in enumerate(["c", "b", "c"]):
            assert_rel_close(mixed[i], tuned[name](x[i:i + 1])[0], 1e-5, name=f"{name} by name after the delete")
    delete_adapter(served, "b")  # the active one: the first remaining becomes active
    assert served.qrlora_adapter_ids == {"c": 0} and lam.shape == (4,)
    with torch.no_grad():
        assert_rel_close(served(x), tuned["c"](x), 1e-5, name="c alone")
    save_adapter(served, tmp_path / "c_again")
    assert json.loads((tmp_path / "c_again" / ADAPTER_CONFIG).read_text())["adapter_name"] == "c"
    for name, error, match in (("c", ValueError, "'c' is the model's only adapter: unload"),
                               ("z", ValueError, r"unknown adapter 'z'"), (0, TypeError, "adapter_name must be")):
        with pytest.raises(error, match=match):
            delete_adapter(served, name)
    load_adapter(served, tmp_path / "a", adapter_name="a")
    assert served.qrlora_adapter_ids == {"c": 0, "a": 1}


def test_apply_qrlora_names_the_adapter_it_makes(base, tmp_path):
    """PEFT's get_peft_model(..., adapter_name=): the name is the model's, saved in the file, and loads under it."""
    model = copy.deepcopy(base)
    apply_qrlora(model, QRLoraConfig(target_modules=["query"], rank=3), progress=False, adapter_name="sst2")
    assert model.qrlora_adapter_ids == {"sst2": 0}
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["adapter_name"] == "sst2"
    served = copy.deepcopy(base)
    assert load_adapter(served, tmp_path / "a") == {"sst2": 0}
    for bad in ("", 3):
        with pytest.raises(TypeError, match="adapter_name must be a non-empty str"):
            apply_qrlora(copy.deepcopy(base), QRLoraConfig(target_modules=["query"], rank=3), adapter_name=bad)
