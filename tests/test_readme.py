"""The README's set-up commands and its three Python sections (Quick start, the pivoted QR, fine-tuning), run as
written, so that what a new user copies keeps working. Not run: the snippet indented inside a list (many adapters in
one batch, which needs trained adapters and a generative model) and the shell commands of the benchmark sections."""
import re
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
