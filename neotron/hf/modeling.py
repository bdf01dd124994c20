"""`NeotronConfig` / `NeotronForCausalLM`: any neotron architecture as a transformers model.

The transformers class is a thin wrapper: it holds neotron's own `CausalLM`, built from the
`model:` section of the run config that `config.json` stores under `neotron`. No modeling code
is copied into an export; the export's `modeling_neotron.py` only imports this module, so
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` needs neotron installed.

Parameter names are the neotron model's, under `model.` (e.g. `model.layers.0.mixer.wq.weight`).
Tied embeddings stay neotron's (the head reads `embed.weight`; there is no `lm_head` to tie),
so `tie_word_embeddings` is False here and the neotron config carries `tie_embeddings`.

Generation: an unpadded batch is prefilled once and decoded one token at a time with neotron's
own cache (neotron/arch/decode.py: KV caches, recurrent states), carried through transformers'
`cache` keyword in a `NeotronCache` (not a transformers `Cache`: the model says it does not
take a DynamicCache). A padded batch is supported through `attention_mask` without a cache
(every step recomputes the whole sequence): each contiguous run of real (or pad) tokens is its
own document, with positions restarting at 0 and no attention or recurrent state across runs,
as in neotron's document masking.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from neotron.arch.context import SeqInfo

SHIM = "modeling_neotron.py"
SHIM_TEXT = '''"""transformers' entry point for a neotron export (`trust_remote_code=True`).

The modeling code is neotron's own, imported from the installed package (pip install neotron):
nothing of the model is defined here."""

from neotron.hf.modeling import NeotronConfig, NeotronForCausalLM

__all__ = ["NeotronConfig", "NeotronForCausalLM"]
'''
AUTO_MAP = {"AutoConfig": "modeling_neotron.NeotronConfig",
            "AutoModelForCausalLM": "modeling_neotron.NeotronForCausalLM"}


def write_shim(out: Path) -> None:
    """The export's `modeling_neotron.py`, and config.json's auto_map pointing at it (when
    config.json exists). A copy of this module that transformers' save_pretrained makes for
    remote-code classes (`modeling.py`) is removed: the shim imports it instead."""
    (out / SHIM).write_text(SHIM_TEXT)
    copy = out / Path(__file__).name
    if copy.is_file() and copy.read_text() == Path(__file__).read_text():
        copy.unlink()
    config = out / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["auto_map"] = AUTO_MAP
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class NeotronConfig(PreTrainedConfig):
    """transformers' view of a neotron model: `neotron` holds the `model:` section of the run
    config (validated by neotron's own schema when the model is built); the other fields
    mirror it for tools that read the usual names."""

    model_type = "neotron"

    neotron: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = False


def seq_info_from_mask(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> SeqInfo:
    """Positions and documents for a (possibly padded) batch: without padding, one document
    per row; with it, every run of equal mask values is a document of its own, so padding
    (left or right) is never attended to and never enters a recurrent state."""
    if attention_mask is None or bool(attention_mask.all()):
        return SeqInfo.for_tokens(tokens)
    mask = attention_mask.to(tokens.device).long()
    B, T = mask.shape
    starts = torch.ones_like(mask, dtype=torch.bool)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
    doc_ids = starts.long().cumsum(dim=1) - 1
    idx = torch.arange(T, device=tokens.device).expand(B, T)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return SeqInfo(positions=idx - first, doc_ids=doc_ids)


class NeotronCache:
    """neotron's DecodeState as `generate` carries it between steps."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: Any) -> None:
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every state tensor follows its row (all are batch-first)."""
        def pick(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.index_select(0, beam_idx.to(x.device))
            if isinstance(x, dict):
                return {k: pick(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(pick(v) for v in x)
            return x

        self.state.layers = pick(self.state.layers)


class NeotronForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NeotronConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["Block"]

    def __init__(self, config: NeotronConfig) -> None:
        super().__init__(config)
        from neotron.arch.config import ModelConfig
        from neotron.arch.model import CausalLM

        if not config.neotron:
            raise ValueError("NeotronConfig.neotron is empty: not a neotron export")
        self.model = CausalLM(ModelConfig.model_validate(config.neotron))
        if not next(self.model.parameters()).is_meta:  # from_config: a fresh neotron init
            self.model.init_weights()
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers initializes what a checkpoint did not fill: here only the
        non-persistent buffers (BitLinear's lambda, UltraMem's slot permutation), which neotron
        computes in `init_weights`. transformers guards torch.nn.init against overwriting
        loaded parameters during this call; the snapshot also covers init code that writes in
        place (copy_, fill_). (`from_config` gets neotron's full initialization in `__init__`.)"""
        if module is self:
            return
        buffers = [n for n, _ in module.named_buffers(recurse=False)
                   if n in module._non_persistent_buffers_set]
        init = getattr(module, "init_weights", None)
        if not buffers or init is None:
            return
        kept = {n: p.detach().clone() for n, p in module.named_parameters()}
        needs_std = any(p.default is inspect.Parameter.empty
                        for p in inspect.signature(init).parameters.values())
        init(1.0) if needs_std else init()  # the std only draws parameters, restored below
        for n, p in module.named_parameters():
            p.copy_(kept[n])

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """transformers' save, then the export layout again: the one-line shim and auto_map
        pointing at it, instead of a copy of this module."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_shim(Path(save_directory))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is neotron's own (NeotronCache), made by forward

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, return_dict: bool | None = None,
                cache: NeotronCache | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        from neotron.arch.decode import check_decodable, prefill, step
        from neotron.errors import UsageError

        if isinstance(cache, NeotronCache):  # one new token per row
            logits, state = step(self.model, input_ids[:, -1], cache.state)
            return CausalLMOutputWithPast(logits=logits[:, None], cache=NeotronCache(state))
        unpadded = attention_mask is None or bool(attention_mask.all())
        if use_cache and unpadded and labels is None:
            try:
                check_decodable(self.model)
            except UsageError:
                pass  # a mixer without cached decoding: recompute every step
            else:
                logits, state = prefill(self.model, input_ids)
                return CausalLMOutputWithPast(logits=logits, cache=NeotronCache(state))
        logits = self.model(input_ids, seq_info_from_mask(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor,
                                      attention_mask: torch.Tensor | None = None,
                                      cache: NeotronCache | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        if isinstance(cache, NeotronCache):  # after the prefill: the newest token only
            return {"input_ids": input_ids[:, -1:], "cache": cache}
        # First call (prefill, when unpadded), or a padded batch: the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know model_type `neotron` in this process,
    so that an export loads without its shim (and without trust_remote_code) once neotron is
    imported. Idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("neotron", NeotronConfig, exist_ok=True)
    AutoModelForCausalLM.register(NeotronConfig, NeotronForCausalLM, exist_ok=True)


register_auto_classes()
