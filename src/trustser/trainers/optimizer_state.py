"""A torch optimizer's state without pickle: tensors in safetensors, the rest in JSON. Used for the
SED controller's Adam in rectification checkpoints (the SLM's optimizer is the Trainer's)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from ..utils import atomic_write_json


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """A safetensors file written atomically (a temporary file renamed into place)."""
    tmp = f"{path}.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)


def save_optimizer_state(optimizer: torch.optim.Optimizer, path_stem: str | os.PathLike) -> None:
    """``<stem>.safetensors`` (every tensor of the state) + ``<stem>.json`` (param groups and
    non-tensor state): a torch optimizer's state_dict without pickle."""
    sd = optimizer.state_dict()
    tensors, meta_state = {}, {}
    for idx, st in sd["state"].items():
        meta_state[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
                meta_state[str(idx)][k] = {"tensor": True}
            else:
                meta_state[str(idx)][k] = {"value": v}
    stem = str(path_stem)
    save_tensors(tensors, f"{stem}.safetensors")
    atomic_write_json(f"{stem}.json", {"state": meta_state, "param_groups": sd["param_groups"]})


def load_optimizer_state(optimizer: torch.optim.Optimizer, path_stem: str | os.PathLike) -> None:
    """Inverse of ``save_optimizer_state``; a missing file is an error naming it."""
    stem = str(path_stem)
    for suffix in (".safetensors", ".json"):
        if not os.path.exists(stem + suffix):
            raise FileNotFoundError(f"{stem + suffix}: controller optimizer state missing from the checkpoint")
    tensors = load_file(f"{stem}.safetensors")
    with open(f"{stem}.json", encoding="utf-8") as fh:
        meta = json.load(fh)
    state = {}
    for idx, entries in meta["state"].items():
        state[int(idx)] = {
            k: (tensors[f"state.{idx}.{k}"] if e.get("tensor") else e["value"]) for k, e in entries.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


__all__ = ["save_optimizer_state", "load_optimizer_state", "save_tensors"]
