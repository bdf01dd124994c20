"""`neotron.load_model(path)`: any saved neotron model, as neotron's own `CausalLM`.

`path` may be:
- a run directory (its latest checkpoint) or one checkpoint directory (step_XXXXXXXX, with
  the run's config.yaml two levels up), read with the allow-listed DCP reader;
- a `neotron convert` output (model.safetensors + config.yaml);
- a Hugging Face export (`--format hf`: config.json, safetensors, tokenizer files), Llama or
  Neotron; any LlamaForCausalLM directory in safetensors loads the same way.

The model comes back in eval mode on `device`, with
    model.cfg         the `model:` config (neotron.arch.config.ModelConfig)
    model.run_config  the run's full RunConfig, when one is stored (else None)
    model.tokenizer   neotron's LoadedTokenizer (encode / decode / eos_id), when one is found
                      (the export's tokenizer.json, or the run's data.dir), else None
    model.source      the directory or checkpoint it was read from
and `model(tokens)` maps token ids [B, T] to logits [B, T, vocab].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neotron.errors import UsageError


def check_fit(want: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
              where: Path) -> None:
    """UsageError unless `tensors` has exactly the names and shapes of the state dict `want`."""
    missing = sorted(want.keys() - tensors.keys())
    extra = sorted(tensors.keys() - want.keys())
    shapes = sorted(k for k in want.keys() & tensors.keys()
                    if tuple(want[k].shape) != tuple(tensors[k].shape))
    if missing or extra or shapes:
        raise UsageError(f"{where}: the weights do not fit the stored config (missing"
                         f" {missing[:3]}, unexpected {extra[:3]}, other shape {shapes[:3]})")


def _build(model_cfg: Any, tensors: dict[str, torch.Tensor], device: str | torch.device,
           where: Path) -> Any:
    from neotron.arch.model import build_model, materialize

    # materialize runs neotron's init first: non-persistent buffers (BitLinear's lambda,
    # UltraMem's slot permutation) are computed there, and parameters are then overwritten.
    model = materialize(build_model(model_cfg), "cpu", seed=0)
    check_fit(model.state_dict(), tensors, where)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # a bf16 export stays bf16
        model.to(dtypes.pop())
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def _tokenizer(path: Path | None, eos_token: str | None) -> Any:
    from neotron.data.config import EOS_TOKEN
    from neotron.data.tokenizer import load_tokenizer

    if path is None or not path.is_file():
        return None
    return load_tokenizer(path, eos_token or EOS_TOKEN)


def _run_tokenizer(run_cfg: Any) -> Any:
    tk = run_cfg.data.tokenizer
    return _tokenizer(Path(tk.path or Path(run_cfg.data.dir) / "tokenizer.json").expanduser(),
                      tk.eos_token)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """The model stored at `path` (see the module docstring), in eval mode on `device`."""
    from neotron.config import load
    from neotron.hf.files import eos_token_of, read_json, read_weights

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    run_cfg = None
    if (path / "config.json").is_file():  # a Hugging Face directory
        hf = read_json(path / "config.json")
        tensors = read_weights(path)
        if hf.get("model_type") == "neotron":
            from neotron.arch.config import ModelConfig

            model_cfg = ModelConfig.model_validate(hf.get("neotron") or {})
            tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
        elif hf.get("model_type") == "llama":
            from transformers import LlamaConfig

            from neotron.arch.config import ModelConfig
            from neotron.hf.llama import from_llama_config, from_llama_names

            model_cfg = ModelConfig.model_validate(
                from_llama_config(LlamaConfig.from_pretrained(str(path))))
            tensors = from_llama_names(tensors, tied=model_cfg.tie_embeddings)
        else:
            raise UsageError(f"{path}: model_type '{hf.get('model_type')}' is neither a neotron"
                             " nor a Llama export")
        if (path / "config.yaml").is_file():
            run_cfg = load(path / "config.yaml")
        tokenizer = _tokenizer(path / "tokenizer.json", eos_token_of(path))
        source = path
    elif (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        run_cfg = load(path / "config.yaml")  # a `neotron convert` output
        model_cfg, tensors = run_cfg.model, read_weights(path)
        tokenizer, source = _run_tokenizer(run_cfg), path
    else:
        from neotron.convert import find_checkpoint, load_model_tensors

        ckpt, run_dir = find_checkpoint(path)
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            raise UsageError(f"{ckpt}: no config.yaml in its run directory, so the model's"
                             " shape is unknown")
        run_cfg = load(run_dir / "config.yaml")
        model_cfg, tensors = run_cfg.model, load_model_tensors(ckpt)
        tokenizer, source = _run_tokenizer(run_cfg), ckpt
    model = _build(model_cfg, tensors, device, source)
    model.run_config = run_cfg
    model.tokenizer = tokenizer
    model.source = str(source)
    return model
