"""`neotron convert --from-hf DIR OUT`: a Hugging Face Llama checkpoint as a neotron run.

    OUT/config.yaml                      a run config whose `model:` is the Llama (neotron's
                                         attention + SwiGLU blocks), data.tokenizer.path = the
                                         copied tokenizer
    OUT/tokenizer.json                   DIR's tokenizer, when DIR has one
    OUT/checkpoints/step_00000000/       a DCP checkpoint (format 3) holding the model only
    OUT/checkpoints/latest
    OUT/neotron.json                     where it came from

`train.init_from: OUT` starts a run from these weights (continued pretraining, or a
recursive model mapped from them, neotron/arch/recursion_init.py); `neotron.load_model(OUT)`
and `neotron convert OUT X --format hf` read it like any run. It holds no optimizer state, so
it is not a run to resume: give the new run its own run_dir.

Only safetensors weights are read (no pickle), only Llama configs are accepted (a Mistral,
Qwen or other model_type is refused with one line), and a Llama variant neotron's blocks do not
express (rope scaling, MLP bias, another activation) is refused by name.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from neotron.errors import ConfigError, UsageError
from neotron.hf.files import eos_token_of, prepare_out, read_json, read_weights


def _write_checkpoint(tensors: dict[str, torch.Tensor], ckpt_dir: Path, meta: dict) -> Path:
    """A model-only DCP checkpoint at step 0, made complete the way Checkpointer makes one:
    written in a temporary directory, meta.json last, renamed, then `latest`."""
    import torch.distributed.checkpoint as dcp

    from neotron.train.checkpoint import FORMAT, step_dir_name

    final = ckpt_dir / step_dir_name(0)
    tmp = ckpt_dir / f".tmp-{final.name}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():  # DCP warns without a process group: one process is fine
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is not initialized.*")
        dcp.save({"model": tensors}, storage_writer=dcp.FileSystemWriter(tmp))
    record = {"step": 0, "format": FORMAT, "world_size": 1, "tokens": 0, **meta}
    (tmp / "meta.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    os.rename(tmp, final)
    (ckpt_dir / "latest").write_text(final.name + "\n")
    return final


def import_hf(source: str | Path, out: str | Path, *, dtype: str | None = None,
              force: bool = False) -> dict[str, Any]:
    from transformers import LlamaConfig

    from neotron.arch.config import ModelConfig
    from neotron.arch.model import build_model
    from neotron.config import to_yaml, validate
    from neotron.convert import DTYPES
    from neotron.data.tokenizer import load_tokenizer
    from neotron.hf.llama import from_llama_config, from_llama_names
    from neotron.hf.load import check_fit

    src = Path(source)
    if not (src / "config.json").is_file():
        raise UsageError(f"{src} is not a Hugging Face model directory (no config.json)")
    model_type = read_json(src / "config.json").get("model_type")
    if model_type != "llama":
        raise UsageError(f"--from-hf reads Llama checkpoints (model_type 'llama'); {src} is"
                         f" '{model_type}'")
    out = prepare_out(out, force)
    hf_cfg = LlamaConfig.from_pretrained(str(src))
    model_dict = from_llama_config(hf_cfg)
    try:
        model_cfg = ModelConfig.model_validate(model_dict)
    except ValueError as e:
        raise UsageError(f"{src}: its Llama config has no neotron equivalent ({e})") from None
    tensors = from_llama_names(read_weights(src), tied=model_cfg.tie_embeddings)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
                   for k, v in tensors.items()}
    check_fit(build_model(model_cfg).state_dict(), tensors, src)  # on meta: shapes only

    data: dict[str, Any] = {"seq_len": min(256, model_cfg.max_seq_len)}
    tokenizer = None
    if (src / "tokenizer.json").is_file():
        eos = eos_token_of(src)
        if eos is None and isinstance(hf_cfg.eos_token_id, int):
            from tokenizers import Tokenizer

            eos = Tokenizer.from_file(str(src / "tokenizer.json")).id_to_token(hf_cfg.eos_token_id)
        if eos is not None:
            tokenizer = load_tokenizer(src / "tokenizer.json", eos)  # DataError if not usable
            data["tokenizer"] = {"eos_token": eos}

    if out.exists():  # --force: every check passed, replace what was there
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if tokenizer is not None:
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        data["tokenizer"]["path"] = str((out / "tokenizer.json").resolve())
    else:  # no tokenizer.json: name the vocabulary size so the run config validates
        data["tokenizer"] = {"vocab_size": max(257, min(4096, model_cfg.vocab_size))}
    run = {"run_dir": str(out.resolve()), "model": model_cfg.model_dump(mode="json"),
           "data": data, "train": {"global_batch_tokens": data["seq_len"] * 8,
                                   "micro_batch_size": 8}}
    try:
        run_cfg = validate(run)
    except ConfigError as e:
        raise UsageError(f"{src}: {e}") from None
    (out / "config.yaml").write_text(
        "# Imported by `neotron convert --from-hf`: start a run from it with train.init_from\n"
        + to_yaml(run_cfg))
    ckpt = _write_checkpoint(tensors, out / "checkpoints",
                             {"imported_from": str(src.resolve())})
    info = {"source": str(src.resolve()), "format": "neotron", "checkpoint": str(ckpt),
            "params": sum(t.numel() for t in tensors.values()), "tensors": len(tensors),
            "tokenizer": str(out / "tokenizer.json") if tokenizer is not None else None}
    (out / "neotron.json").write_text(json.dumps(info, indent=2) + "\n")
    info["out"] = str(out)
    return info
