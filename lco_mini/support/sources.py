"""What a --model string names: a local model folder or a Hugging Face hub id.

Needs neither torch nor transformers, so every command line checks --model in a blink, before
loading anything: a typo in a folder name is "no such folder" at once, not half a minute of hub
retries followed by a network error.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "owner/name"


def looks_like_path(name: str) -> bool:
    """'./m', '/abs/m', '~/m', 'out/mergd', 'runs/a/m', or 'x/m' where a folder x exists here: a path.
    'Qwen/Qwen2.5-Omni-3B' (owner/name, and no folder 'Qwen' here) may be a hub id."""
    if name.startswith((".", "/", "~", "out/")) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name).parent.is_dir()


def model_source(name_or_path) -> str:
    """The model folder (with its config.json) or a string that can be a hub id; anything else is
    FileNotFoundError / NotADirectoryError with a message naming it."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{name}: expected a model folder (config.json, weights), got a file")
        if not (path / "config.json").is_file():
            hint = "; it is a LoRA adapter: pass it as --adapter" if (path / "adapter_config.json").is_file() else ""
            raise FileNotFoundError(f"{name}: not a model folder (no config.json){hint}")
        return str(path)
    if looks_like_path(name):
        raise FileNotFoundError(f"{name}: no such folder (read as a local path, not a hub id)")
    if not HUB_ID.match(name):
        raise FileNotFoundError(f"{name}: no such folder, and not a Hugging Face hub id like 'Qwen/Qwen2.5-Omni-3B'")
    return name
