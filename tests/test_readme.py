"""The README's set-up commands and its Python code (Quick start, the pivoted QR, fine-tuning, and the many-adapters
snippet in the fine-tuning list), run as written, so that what a new user copies keeps working. Not run: the shell
commands of the benchmark sections."""
import copy
import re
import textwrap
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from qrlora_kernels import QRLoraLinear
from qrlora_kernels.testing import assert_rel_close, rel_error

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README's section ``## heading`` (up to the next ``## ``)."""
    _, found, rest = README.partition(f"\n## {heading}\n")
    assert found, f"README has no section '## {heading}'"
    section = rest.split("\n## ", 1)[0]
    blocks = re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.S | re.M)
    assert blocks, f"README section {heading!r} has no {language} block"
    return blocks


def _run(code: str, heading: str, namespace: dict) -> dict:
    exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    return namespace


def test_ci_runs_exactly_the_readme_test_command_and_make_bench_the_main_job():
    lines = _blocks("Set-up: two commands", "bash")[0].splitlines()
    commands = [line.split("#", 1)[0].strip() for line in lines if line.strip()]
    assert commands == ["make bench", "make test"], commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "make test", f".ci/run ends with {ci[-1]!r}, not the README's test command"
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert shlex.split(recipe.splitlines()[-1])[1:] == ["-m", "benchmarks.throughput"], recipe


def test_quick_start_runs_as_written_and_its_comments_hold():
    torch.manual_seed(0)
    heading = "Quick start"
    (code,) = _blocks(heading, "python")
    ns = _run(code, heading, {})
    base, layer, x, y = ns["base"], ns["layer"], ns["x"], ns["y"]
    assert isinstance(ns["plain"], nn.Linear)
    assert "tau=0.9" in repr(layer) and f"rank={layer.rank}" in repr(layer)  # "shows the rank and tau"
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.lam]  # "the only trainable tensor"
    assert layer.lam.shape[0] == 2 and y.shape == x.shape  # two adapters after add_adapter(), one per sequence
    assert ns["opt"].param_groups[0]["params"] == [layer.lam]  # built after add_adapter(): it trains the live lam
    with torch.no_grad():  # every lam is still 0: the layer, with either adapter, computes the base layer
        assert_rel_close(y, base(x), 1e-6, name="README quick start at lam = 0")
    Q, R, perm = ns["Q"], ns["R"], ns["perm"]
    assert Q.shape == (512, R.shape[0]) and R.shape[1] == 384
    assert torch.equal(perm.sort().values, torch.arange(384))
    assert_rel_close(Q.T @ Q, torch.eye(Q.shape[1]), 1e-5, name="README qrcp: orthonormal Q")


def test_qrcp_section_runs_as_written_and_its_comments_hold():
    torch.manual_seed(0)
    heading = "Pivoted QR: `qrlora_kernels.qrcp`"
    (code,) = _blocks(heading, "python")
    W = torch.randn(300, 200, dtype=torch.float64)
    batch = [torch.randn(96, 80) for _ in range(3)]  # the block continues a session that has these and torch
    ns = _run(code, heading, {"torch": torch, "W": W, "W1": batch[0], "W2": batch[1], "W3": batch[2]})
    raw = ns["raw"]  # "only the leading 64 columns of Q": W[:, perm[:64]] = Q_64 R[:64, :64]
    assert_rel_close(raw.q(64) @ raw.r()[:64, :64], W[:, raw.perm[:64]], 1e-12, name="README raw form")
    R, perm = ns["R"], ns["perm"]  # the last line: "R and the pivots; Q never formed" (empty, as torch.linalg.qr)
    assert ns["_"].numel() == 0 and torch.equal(perm, raw.perm) and torch.equal(R, raw.r())
    assert len(ns["results"]) == 3
    for A, (Q, R, perm) in zip(batch, ns["results"]):  # tau=0.9: the leading columns are factored exactly
        k = R.shape[0]
        assert 0 < k < 80
        assert_rel_close(Q @ R[:, :k], A[:, perm[:k]], 1e-5, name="README qrcp_batched")


def test_fine_tuning_section_runs_as_written(tmp_path, monkeypatch):
    """The section's block, offline: "roberta-base" is a small RoBERTa masked-LM checkpoint (as the real one is, so
    each from_pretrained draws a new classification head) saved in a local folder of that name, which
    from_pretrained reads before the Hub; the Hub is a FakeHub; the "train" comment becomes random lam and head
    values. The adapter then carries both to base models with other random heads, through a folder and through
    the Hub, and merging keeps the outputs."""
    pytest.importorskip("huggingface_hub")
    from transformers import RobertaConfig, RobertaForMaskedLM
    from fake_hub import FakeHub
    heading = "Fine-tuning a model"
    (code,) = _blocks(heading, "python")
    comment = "# ... train: only the lam vectors (and modules_to_save) require grad ...\n"
    assert comment in code
    code = code.replace(comment, "train_stand_in(model)\n")
    torch.manual_seed(0)
    RobertaForMaskedLM(RobertaConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40)).save_pretrained(tmp_path / "roberta-base")
    monkeypatch.chdir(tmp_path)
    FakeHub(tmp_path, monkeypatch)

    def train_stand_in(model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.ndim == 1 or "classifier" in n for n, p in model.named_parameters()
                                 if p.requires_grad)
        with torch.no_grad():
            for p in trainable:
                p.copy_(torch.randn_like(p))

    ns = _run(code, heading, {"train_stand_in": train_stand_in})
    model, base, other, report = ns["model"], ns["base"], ns["other"], ns["report"]
    assert len(report.modules) == 4 and (tmp_path / "adapters" / "sst2" / "adapter.safetensors").is_file()
    ids = torch.randint(3, 120, (3, 12))
    with torch.no_grad():
        adapted = model.eval()(input_ids=ids).logits
        assert rel_error(adapted, type(model).from_pretrained("roberta-base", num_labels=2)(input_ids=ids).logits) \
            > 0.1  # another head
        assert_rel_close(base.eval()(input_ids=ids).logits, adapted, 1e-5, name="loaded from a folder, merged")
        assert_rel_close(other.eval()(input_ids=ids).logits, adapted, 1e-5, name="loaded from the Hub")
    assert all(type(m) is not QRLoraLinear for m in base.modules())  # merge_and_unload: plain layers again


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")  # the snippet, as written
def test_many_adapters_snippet_runs_as_written(tmp_path, monkeypatch):
    """The indented snippet under "Many adapters in one batch", on a small Llama-style decoder with two adapters
    saved where the snippet loads them: each sequence's logits, and its beams, are those of the model that has
    only that sequence's adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from qrlora_kernels import QRLoraConfig, adapter_batch, apply_qrlora, load_adapter, save_adapter
    from qrlora_kernels.model import qrlora_layers
    _, found, rest = README.partition("* **Many adapters in one batch**")
    assert found, "README has no 'Many adapters in one batch' item"
    code = textwrap.dedent(re.search(r"^ *```python\n(.*?)^ *```", rest, flags=re.S | re.M).group(1))
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    monkeypatch.chdir(tmp_path)
    tuned = {}
    for task in ("chat", "code"):
        tuned[task] = copy.deepcopy(base)
        apply_qrlora(tuned[task], QRLoraConfig(target_modules=["q_proj", "v_proj"], rank=6), progress=False)
        with torch.no_grad():
            for _, layer in qrlora_layers(tuned[task]):
                layer.lam.normal_(0.0, 3.0)
        save_adapter(tuned[task], f"adapters/{task}")
    batch = {"input_ids": torch.randint(3, 96, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    model = copy.deepcopy(base)
    with torch.no_grad():
        ns = _run(code, "Many adapters in one batch", {"model": model, "batch": batch, "load_adapter": load_adapter,
                                                      "adapter_batch": adapter_batch})
    assert "generate" not in vars(model)  # the block's generate wrapper is gone afterwards
    logits, out = ns["logits"], ns["out"]
    assert out.shape[0] == 3 and out.shape[1] > 7
    with torch.no_grad():
        for i, task in enumerate(["chat", "code", "chat"]):
            row = {k: v[i:i + 1] for k, v in batch.items()}
            alone = tuned[task](**row).logits
            assert rel_error(alone, base(**row).logits) > 1e-3  # the adapter changes this sequence's output
            assert_rel_close(logits[i:i + 1], alone, 1e-5, name=f"sequence {i} ({task}) logits")
            generated = tuned[task].generate(**row, num_beams=4)
            assert torch.equal(out[i:i + 1, :generated.shape[1]], generated), f"sequence {i} ({task}) beams"
            assert (out[i, generated.shape[1]:] == base.config.pad_token_id).all()  # a shorter one is padded
