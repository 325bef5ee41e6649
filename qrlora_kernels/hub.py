"""Adapters on the Hugging Face Hub: where ``load_adapter`` finds a repository id, and ``push_adapter_to_hub``.

An adapter on the Hub is the folder ``save_adapter`` writes (``adapter_config.json`` + ``adapter.safetensors``)
in a model repository, as PEFT keeps its adapters. ``huggingface_hub`` does the downloading and caching (and
honours ``HF_HUB_OFFLINE`` / ``HF_HOME``); it comes with ``transformers`` and is imported only when needed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def resolve_adapter_folder(path: Union[str, os.PathLike], *, revision: Optional[str] = None,
                           token: Union[str, bool, None] = None) -> Path:
    """The local folder of an adapter: ``path`` itself when it exists, else the Hub repository ``path`` names
    (downloaded, or found in the cache when offline) at ``revision`` (a branch, tag or commit; default main)."""
    folder = Path(path)
    if folder.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} selects a version of a Hub repository, but {os.fspath(path)!r} "
                             f"is a local path")
        return folder
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
        snapshot = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, token=token,
                                                          allow_patterns=list(ADAPTER_FILES)))
    except Exception as err:  # offline and not cached, unknown repo or revision, no access, network errors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FileNotFoundError(f"{repo_id}: not a local folder, and not found on the Hugging Face Hub{at} "
                                f"({type(err).__name__}: {first_line})") from err
    missing = [name for name in ADAPTER_FILES if not (snapshot / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Hub repository {repo_id}{at} has no {' or '.join(missing)}: it does not hold a "
                                f"QR-LoRA adapter (save_adapter / push_adapter_to_hub write both files)")
    return snapshot


def push_adapter_to_hub(model: nn.Module, repo_id: str, *, include_basis: bool = False,
                        adapter_name: Optional[str] = None, private: Optional[bool] = None,
                        token: Union[str, bool, None] = None, revision: Optional[str] = None,
                        commit_message: str = "Upload QR-LoRA adapter",
                        is_main_process: Optional[bool] = None):
    """``save_adapter`` into the Hub repository ``repo_id`` (created if needed), as PEFT's ``push_to_hub``.

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
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message, allow_patterns=list(ADAPTER_FILES))
