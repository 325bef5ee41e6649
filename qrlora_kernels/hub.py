"""Adapters on the Hugging Face Hub: where ``load_adapter`` finds a repository id, and ``push_adapter_to_hub``.

An adapter on the Hub is the folder ``save_adapter`` writes (``adapter_config.json`` + ``adapter.safetensors``)
in a model repository, as PEFT keeps its adapters. ``huggingface_hub`` does the downloading and caching (and
honours ``HF_HUB_OFFLINE`` / ``HF_HOME``); it comes with ``transformers`` and is imported only when needed.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_ADAPTER_FOLDER, save_adapter
from .model import unwrap_model

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MODEL_CARD = "README.md"


def _adapter_in(folder: Path) -> Path:
    """``folder``, or its ``qrlora-adapter`` subfolder when only that holds an adapter (a Trainer checkpoint, or a
    Hub repository that Trainer pushed to, with ``QRLoraCheckpointCallback``)."""
    inner = folder / CHECKPOINT_ADAPTER_FOLDER
    if not (folder / ADAPTER_CONFIG).exists() and (inner / ADAPTER_CONFIG).is_file():
        return inner
    return folder


def resolve_adapter_folder(path: Union[str, os.PathLike], *, revision: Optional[str] = None,
                           token: Union[str, bool, None] = None) -> Path:
    """The local folder of an adapter: ``path`` itself when it exists (or its ``qrlora-adapter`` subfolder, for a
    Trainer checkpoint written with ``QRLoraCheckpointCallback``), else the Hub repository ``path`` names
    (downloaded, or found in the cache when offline) at ``revision`` (a branch, tag or commit; default main): its
    top level, or its ``qrlora-adapter`` folder (what ``Trainer``'s pushes carry with the callback)."""
    folder = Path(path)
    if folder.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} selects a version of a Hub repository, but {os.fspath(path)!r} "
                             f"is a local path")
        return _adapter_in(folder)
    repo_id = os.fspath(path)
    try:
        import huggingface_hub
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise FileNotFoundError(f"{repo_id}: no such adapter folder (huggingface_hub, which would look it up on the "
                                f"Hugging Face Hub, is not installed)") from None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id}: no such adapter folder") from None
    at = f" at revision {revision!r}" if revision is not None else ""
    try:
        snapshot = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token,
            allow_patterns=[*ADAPTER_FILES, *(f"{CHECKPOINT_ADAPTER_FOLDER}/{name}" for name in ADAPTER_FILES)]))
    except Exception as err:  # offline and not cached, unknown repo or revision, no access, network errors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FileNotFoundError(f"{repo_id}: not a local folder, and not found on the Hugging Face Hub{at} "
                                f"({type(err).__name__}: {first_line})") from err
    snapshot = _adapter_in(snapshot)
    missing = [name for name in ADAPTER_FILES if not (snapshot / name).is_file()]
    if missing and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"Hub repository {repo_id}{at}: {' and '.join(missing)} not in the local cache, "
                                f"and HF_HUB_OFFLINE is set")
    if missing:
        # (huggingface_hub falls back to the local cache when the Hub cannot be reached, with no error: a cached
        # copy that lacks a file looks like a repository without it.)
        raise FileNotFoundError(f"Hub repository {repo_id}{at} has no {' or '.join(missing)}: it does not hold a "
                                f"QR-LoRA adapter (save_adapter / push_adapter_to_hub write both files), or the Hub "
                                f"could not be reached and the local cache holds only part of it")
    return snapshot


def push_adapter_to_hub(model: nn.Module, repo_id: str, *, include_basis: bool = False,
                        adapter_name: Optional[str] = None, private: Optional[bool] = None,
                        token: Union[str, bool, None] = None, revision: Optional[str] = None,
                        commit_message: str = "Upload QR-LoRA adapter",
                        is_main_process: Optional[bool] = None):
    """``save_adapter`` into the Hub repository ``repo_id`` (created if needed), as PEFT's ``push_to_hub``, with a
    model card (``README.md``) unless the repository has one already.

    ``load_adapter(base_model, repo_id)`` reads it back. Arguments as in ``save_adapter`` (under FSDP2 call it on
    every rank; only the main process uploads) and ``huggingface_hub.HfApi.upload_folder``. Returns the commit
    information of the upload, or None on the other ranks.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="qrlora-adapter-") as folder:
        written = save_adapter(model, folder, include_basis=include_basis, adapter_name=adapter_name,
                               is_main_process=is_main_process)
        if not written["config"].is_file():  # not the main process: it took part in the gathering only
            return None
        api = HfApi(token=token)
        # The Hub's full id: a bare name becomes "<user>/<name>", which the upload and the model card must use.
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)  # upload_folder needs the branch to exist
        files = list(ADAPTER_FILES)
        if not api.file_exists(repo_id, MODEL_CARD, revision=revision):  # a card of the user's own is kept
            write_model_card(Path(folder), repo_id, unwrap_model(model))
            files.append(MODEL_CARD)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message, allow_patterns=files)


def write_model_card(folder: Path, repo_id: str, model: nn.Module) -> Path:
    """``folder/README.md``: the Hub's model card for the adapter ``save_adapter`` wrote into ``folder`` from
    ``model`` (metadata that lets the Hub list it under its base model, what it adapts, and how to load it)."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = meta.get("base_model_name_or_path")
    ranks = [info["rank"] for info in meta["modules"].values()]
    saved = list(meta.get("modules_to_save") or {})
    data = ModelCardData(library_name="qrlora-kernels", base_model=base, tags=["qrlora", "peft", "adapter"])
    cls = type(model).__name__
    from_transformers = type(model).__module__.startswith("transformers.")
    imports = f"from transformers import {cls}\n" if from_transformers else ""
    made = f'{cls}.from_pretrained("{base}")' if base and from_transformers else f"...  # the {cls} it was made on"
    rank_text = f"rank {ranks[0]}" if min(ranks) == max(ranks) else f"ranks {min(ranks)} to {max(ranks)}"
    text = f"""---
{data.to_yaml()}
---

# QR-LoRA adapter{f" for {base}" if base else ""}

A [QR-LoRA](https://arxiv.org/abs/2508.21810) adapter made with `qrlora-kernels`: {sum(ranks)} trainable
coefficients over {len(ranks)} adapted module{"s" if len(ranks) != 1 else ""} ({rank_text}){
f", plus the fully trained {', '.join(saved)}" if saved else ""}. The file holds the coefficients and the pivots{
" and the bases" if meta.get("include_basis") else ""}; the bases are rebuilt from the base model's weights, which
are checked against fingerprints at load.

```python
{imports}from qrlora_kernels import load_adapter

model = {made}
load_adapter(model, "{repo_id}")
```
"""
    path = folder / MODEL_CARD
    ModelCard(text).save(path)
    return path
