"""A zoo name, a Hugging Face repo id or a local directory -> a local snapshot directory."""

from __future__ import annotations

import os
from pathlib import Path

from .registry import MODELS, list_models

# What a parallel model needs from a repository: no *.bin, no *.pth.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken"]


def resolve(name_or_path) -> Path:
    """A local directory holding the model. Honours HF_HOME and HF_HUB_OFFLINE (through huggingface_hub)."""
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    entry = MODELS.get(name)
    if entry is None and name.count("/") != 1:
        raise ValueError(
            f"unknown model '{name}': not a directory, not a zoo name, not a Hugging Face repo id (org/name). "
            f"Zoo names: {', '.join(list_models())}"
        )
    if entry is not None and entry.bundled is not None:
        if not (entry.bundled / "config.json").exists():
            raise FileNotFoundError(f"the bundled model '{name}' is missing from {entry.bundled}: reinstall nxd-zoo")
        return entry.bundled
    repo_id = entry.repo_id if entry else name
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=constants.HF_HUB_OFFLINE))
    except LocalEntryNotFoundError as exc:
        label = f"'{name}' ({repo_id})" if entry else f"'{repo_id}'"
        raise FileNotFoundError(
            f"model {label} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be "
            f"downloaded{' because HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else ''}. "
            f"Download it where there is network with `hf download {repo_id}` (same HF_HOME), "
            "or pass the path of a local directory that holds config.json and *.safetensors."
        ) from exc
