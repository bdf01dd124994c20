"""The files of a Hugging Face model directory: safetensors weights (one file, or shards with
an index above a size threshold, in transformers' layout) and the tokenizer files.

Only safetensors are read: a directory holding nothing but `pytorch_model.bin` (a pickle) is
refused, like any pickle outside neotron's allow-list.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from neotron.errors import UsageError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '200MiB', '1000' -> bytes (as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--max-shard-size: '{text}' is not a size (e.g. 5GB, 200MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def prepare_out(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"{out} exists and is not empty (--force overwrites)")
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write `tensors` as transformers does: one `model.safetensors`, or, when they exceed
    `max_shard_bytes`, `model-0000k-of-0000n.safetensors` shards (in order, a tensor bigger
    than the limit alone in its shard) plus `model.safetensors.index.json`. Returns the file
    names."""
    from safetensors.torch import save_file

    meta = {"format": "pt", **(metadata or {})}  # transformers refuses files without "pt"
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += _nbytes(t)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / WEIGHTS, out / INDEX]:
        stale.unlink(missing_ok=True)  # --force over an earlier export with another sharding
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS), metadata=meta)
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
             "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (`model.safetensors` or the shards its index names)."""
    from safetensors.torch import load_file

    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{directory / INDEX}: unreadable index ({e})") from None
        files = sorted(set(weight_map.values()))
        if any("/" in f or f.startswith(".") for f in files):
            raise UsageError(f"{directory / INDEX}: shard names must be plain file names")
    elif (directory / WEIGHTS).is_file():
        files = [WEIGHTS]
    elif (directory / "pytorch_model.bin").is_file():
        raise UsageError(f"{directory} holds only pytorch_model.bin (a pickle, which neotron does"
                         " not load); save it with safetensors (save_pretrained's default)")
    else:
        raise UsageError(f"{directory} has no {WEIGHTS} and no {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not (directory / f).is_file():
            raise UsageError(f"{directory}: shard {f} named by {INDEX} is missing")
        tensors.update(load_file(str(directory / f)))
    return tensors


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    return data


def write_tokenizer(tokenizer_json: Path, eos_token: str, out: Path, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, so that
    `AutoTokenizer.from_pretrained(out)` gives neotron's tokenizer with its EOS. The class is
    named PreTrainedTokenizerFast, which transformers 4.x and 5.x both resolve."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=eos_token)
    tok.model_max_length = max_length
    tok.save_pretrained(str(out))
    config = read_json(out / "tokenizer_config.json")
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos_token}, indent=2)
                                                 + "\n")


def eos_token_of(directory: Path) -> str | None:
    """The EOS token named by an HF directory's tokenizer_config.json (or None)."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    eos = read_json(path).get("eos_token")
    if isinstance(eos, dict):  # AddedToken serialized
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
