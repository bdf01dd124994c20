"""A neotron model that is exactly a Llama, and back: the config fields and parameter names.

Equivalence, field by field (transformers' LlamaForCausalLM, 5.x):
- embed -> stack of pre-norm blocks -> RMSNorm -> head, with `tie_word_embeddings` for a tied
  head; RMSNorm in fp32 with the weight applied after (both), eps = `rms_norm_eps`;
- attention: grouped-query SDPA, RoPE in the rotate-half layout (neotron/arch/rope.py's
  default, so q/k rows need no permutation), `rope_theta`, the same bias on q, k, v, o
  (`attention_bias`), no qk-norm, head_dim = `head_dim`;
- FFN: SwiGLU, w2(silu(w1 x) * w3 x) = down(silu(gate x) * up x), no bias.

Anything else (another mixer or FFN, qk-norm, a quantized or Pattention projection,
recursion, blocks of different shapes, a field this module does not know with a non-default
value) is not a Llama: `llama_mismatches` lists why, and the export falls back to neotron's
own transformers class.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from neotron.errors import UsageError

# neotron name (per layer) <-> Llama name (per layer)
LAYER_NAMES = {
    "mixer_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "mixer.wq": "self_attn.q_proj",
    "mixer.wk": "self_attn.k_proj",
    "mixer.wv": "self_attn.v_proj",
    "mixer.wo": "self_attn.o_proj",
    "ffn.w1": "mlp.gate_proj",
    "ffn.w3": "mlp.up_proj",
    "ffn.w2": "mlp.down_proj",
}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}

# The fields whose meaning the mapping below carries; any other field must keep its default.
_MODEL_FIELDS = {"vocab_size", "dim", "n_layers", "max_seq_len", "norm_eps", "tie_embeddings",
                 "init_std", "dropout", "linear", "linear_exclude", "blocks", "pattern",
                 "recursion", "block_at"}
_ATTN_FIELDS = {"type", "n_heads", "n_kv_heads", "head_dim", "rope_theta", "qk_norm", "bias"}
_SWIGLU_FIELDS = {"type", "hidden_dim", "multiple_of"}


def _non_default(cfg: Any, known: set[str]) -> list[str]:
    """Fields of a pydantic config outside `known` that differ from their default."""
    out = []
    for name, field in type(cfg).model_fields.items():
        if name in known:
            continue
        default = field.get_default(call_default_factory=True)
        if getattr(cfg, name) != default:
            out.append(name)
    return out


def llama_mismatches(model_cfg: Any) -> list[str]:
    """Why this neotron `model:` config is not exactly a Llama ([] when it is)."""
    why = [f"model.{n} is set" for n in _non_default(model_cfg, _MODEL_FIELDS)]
    if model_cfg.recursion is not None:
        why.append("model.recursion (shared, looped blocks)")
    if model_cfg.linear.type != "dense":
        why.append(f"model.linear.type={model_cfg.linear.type}")
    used = sorted(set(model_cfg.layer_blocks()))
    dumps = set()
    for name in used:
        block = model_cfg.blocks[name]
        mixer, ffn = block.mixer, block.ffn
        if mixer.type != "attention":
            why.append(f"model.blocks.{name}.mixer.type={mixer.type}")
        else:
            if mixer.qk_norm:
                why.append(f"model.blocks.{name}.mixer.qk_norm")
            if model_cfg.dim % mixer.n_heads:  # LlamaConfig refuses it, even with head_dim
                why.append(f"model.blocks.{name}.mixer: dim not divisible by n_heads")
            why += [f"model.blocks.{name}.mixer.{n} is set" for n in _non_default(mixer, _ATTN_FIELDS)]
        if ffn.type != "swiglu":
            why.append(f"model.blocks.{name}.ffn.type={ffn.type}")
        else:
            why += [f"model.blocks.{name}.ffn.{n} is set" for n in _non_default(ffn, _SWIGLU_FIELDS)]
        if mixer.type == "attention" and ffn.type == "swiglu":
            dumps.add((mixer.n_heads, mixer.n_kv_heads or mixer.n_heads,
                       mixer.head_dim or model_cfg.dim // mixer.n_heads, mixer.rope_theta,
                       mixer.bias, ffn.hidden(model_cfg.dim)))
    if len(dumps) > 1:
        why.append(f"blocks of different shapes ({', '.join(used)})")
    return why


def to_llama_config(model_cfg: Any, **extra: Any):
    """The LlamaConfig of a model for which `llama_mismatches` is empty."""
    from transformers import LlamaConfig

    block = model_cfg.blocks[model_cfg.layer_blocks()[0]]
    att, ffn = block.mixer, block.ffn
    return LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.dim,
        intermediate_size=ffn.hidden(model_cfg.dim), num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=att.n_heads, num_key_value_heads=att.n_kv_heads or att.n_heads,
        head_dim=att.head_dim or model_cfg.dim // att.n_heads, hidden_act="silu",
        max_position_embeddings=model_cfg.max_seq_len, rms_norm_eps=model_cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": att.rope_theta},
        attention_bias=att.bias, mlp_bias=False, attention_dropout=0.0,
        tie_word_embeddings=model_cfg.tie_embeddings, initializer_range=model_cfg.init_std,
        **extra,
    )


def from_llama_config(cfg: Any) -> dict[str, Any]:
    """The neotron `model:` section (a dict) of a transformers Llama config; UsageError naming
    the field when it is a Llama variant neotron does not express."""
    def refuse(what: str) -> UsageError:
        return UsageError(f"this Llama checkpoint uses {what}, which neotron's attention block"
                          " does not have")

    if getattr(cfg, "model_type", None) != "llama":
        raise UsageError(f"--from-hf reads Llama checkpoints (model_type 'llama'); this one is"
                         f" '{getattr(cfg, 'model_type', None)}'")
    if cfg.hidden_act != "silu":
        raise refuse(f"hidden_act={cfg.hidden_act}")
    if getattr(cfg, "mlp_bias", False):
        raise refuse("mlp_bias")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise refuse(f"rope scaling '{rope.get('rope_type')}'")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise refuse(f"pretraining_tp={cfg.pretraining_tp}")
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    mixer: dict[str, Any] = {"type": "attention", "n_heads": n_heads,
                             "n_kv_heads": cfg.num_key_value_heads or n_heads,
                             "rope_theta": float(rope.get("rope_theta", 10000.0))}
    if head_dim * n_heads != cfg.hidden_size:
        mixer["head_dim"] = head_dim
    if cfg.attention_bias:
        mixer["bias"] = True
    return {
        "vocab_size": cfg.vocab_size, "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers, "max_seq_len": cfg.max_position_embeddings,
        "norm_eps": cfg.rms_norm_eps, "tie_embeddings": bool(cfg.tie_word_embeddings),
        "init_std": cfg.initializer_range,
        "blocks": {"attention": {"mixer": mixer,
                                 "ffn": {"type": "swiglu", "hidden_dim": cfg.intermediate_size}}},
    }


def _rename_layer(rest: str, table: dict[str, str]) -> str | None:
    """A per-layer name through `table`: whole (norm weights) or as `<projection>.<suffix>`."""
    if rest in table:
        return table[rest]
    base, _, suffix = rest.rpartition(".")
    return f"{table[base]}.{suffix}" if base in table else None


def _rename(tensors: dict[str, torch.Tensor], top: dict[str, str], layer: dict[str, str],
            prefixes: tuple[str, str], unknown: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        key = top.get(name)
        m = re.match(rf"^{re.escape(prefixes[0])}(\d+)\.(.+)$", name)
        if key is None and m is not None:
            local = _rename_layer(m.group(2), layer)
            key = f"{prefixes[1]}{m.group(1)}.{local}" if local else None
        if key is None:
            raise UsageError(f"{name}: {unknown}")
        out[key] = t
    return out


def to_llama_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """neotron state-dict names -> LlamaForCausalLM's (a tied model has no lm_head)."""
    return _rename(tensors, TOP_NAMES, LAYER_NAMES, ("layers.", "model.layers."),
                   "no Llama counterpart (not a pure Llama model)")


def from_llama_names(tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> neotron's. A tied model's lm_head (if saved) is dropped;
    RoPE's inv_freq buffers (older exports) are not parameters and are skipped."""
    kept = {k: v for k, v in tensors.items()
            if not (k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight"))}
    return _rename(kept, {v: k for k, v in TOP_NAMES.items()},
                   {v: k for k, v in LAYER_NAMES.items()}, ("model.layers.", "layers."),
                   "not a LlamaForCausalLM parameter")
