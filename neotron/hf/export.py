"""`neotron convert RUN_DIR OUT --format hf`: a checkpoint as a Hugging Face model directory.

    OUT/config.json               LlamaConfig for a pure Llama; NeotronConfig (with auto_map)
                                  for every other architecture
    OUT/generation_config.json    EOS (also used as pad), and use_cache off for NeotronForCausalLM
    OUT/model.safetensors         or model-0000k-of-0000n.safetensors + model.safetensors.index.json
                                  above --max-shard-size
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json
    OUT/modeling_neotron.py       (neotron architectures) the shim auto_map names: it only
                                  imports neotron.hf.modeling; no model code is copied
    OUT/config.yaml, neotron.json the run's config and where the export came from

A model is exported as `LlamaForCausalLM` exactly when `neotron.hf.llama.llama_mismatches`
finds nothing that would change its function; otherwise the reasons are reported in the
summary (`why_not_llama`) and the model is exported as `NeotronForCausalLM`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from neotron.errors import UsageError
from neotron.hf.files import (
    DEFAULT_MAX_SHARD,
    parse_size,
    prepare_out,
    write_tokenizer,
    write_weights,
)


def run_tokenizer(cfg: Any) -> Path:
    """The tokenizer.json a run trained with (data.tokenizer.path, else data.dir's)."""
    path = Path(cfg.data.tokenizer.path or Path(cfg.data.dir) / "tokenizer.json").expanduser()
    if not path.is_file():
        raise UsageError(f"no tokenizer for this run at {path} (data.dir is relative to where the"
                         " run was started; run convert from there, or `neotron prepare` it)")
    return path


def export_hf(source: str | Path, out: str | Path, *, dtype: str | None = None,
              force: bool = False, max_shard_size: str | int = DEFAULT_MAX_SHARD) -> dict[str, Any]:
    from transformers import GenerationConfig

    from neotron.config import load
    from neotron.convert import DTYPES, find_checkpoint, load_model_tensors
    from neotron.data.tokenizer import load_tokenizer
    from neotron.hf.llama import llama_mismatches, to_llama_config, to_llama_names
    from neotron.hf.modeling import AUTO_MAP, SHIM, NeotronConfig, write_shim
    from neotron.train.checkpoint import read_meta

    max_bytes = parse_size(max_shard_size)
    ckpt, run_dir = find_checkpoint(source)
    config_yaml = run_dir / "config.yaml" if run_dir is not None else None
    if config_yaml is None or not config_yaml.is_file():
        raise UsageError(f"--format hf needs the run's config.yaml next to {ckpt.parent}"
                         " (pass the run directory)")
    out = prepare_out(out, force)
    cfg = load(config_yaml)
    tok_path = run_tokenizer(cfg)
    tok = load_tokenizer(tok_path, cfg.data.tokenizer.eos_token)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UsageError(f"{tok_path} has {tok.vocab_size} tokens, more than the model's"
                         f" vocab_size={cfg.model.vocab_size}: not this run's tokenizer")
    tensors = load_model_tensors(ckpt, DTYPES[dtype] if dtype else None)
    torch_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    ids = {"bos_token_id": None, "eos_token_id": tok.eos_id, "pad_token_id": None}

    why = llama_mismatches(cfg.model)
    if not why:
        hf_config = to_llama_config(cfg.model, **ids)
        hf_tensors = to_llama_names(tensors)
    else:
        hf_config = NeotronConfig(
            neotron=cfg.model.model_dump(mode="json"), vocab_size=cfg.model.vocab_size,
            hidden_size=cfg.model.dim, num_hidden_layers=cfg.model.n_layers,
            max_position_embeddings=cfg.model.max_seq_len, auto_map=AUTO_MAP, **ids)
        hf_tensors = {f"model.{k}": v for k, v in tensors.items()}
    arch = "LlamaForCausalLM" if not why else "NeotronForCausalLM"
    hf_config.architectures = [arch]
    hf_config.dtype = torch_dtype

    out.mkdir(parents=True, exist_ok=True)  # only once the checkpoint has loaded
    (out / SHIM).unlink(missing_ok=True)
    hf_config.to_json_file(str(out / "config.json"))
    GenerationConfig(eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
                     use_cache=not why).to_json_file(str(out / "generation_config.json"))
    meta = read_meta(ckpt)
    files = write_weights(hf_tensors, out, max_bytes,
                          {"step": str(meta.get("step")), "source": str(ckpt.resolve())})
    write_tokenizer(tok_path, tok.eos_token, out, cfg.model.max_seq_len)
    if why:
        write_shim(out)
    shutil.copyfile(config_yaml, out / "config.yaml")
    info = {"source": str(ckpt.resolve()), "step": meta.get("step"), "tokens": meta.get("tokens"),
            "format": "hf", "architecture": arch, "why_not_llama": why,
            "params": sum(t.numel() for t in tensors.values()), "dtype": torch_dtype,
            "files": files, "tokenizer": str(tok_path), "trust_remote_code": bool(why)}
    (out / "neotron.json").write_text(json.dumps(info, indent=2) + "\n")
    info["out"] = str(out)
    return info
