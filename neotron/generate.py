"""`neotron generate PATH --prompt TEXT`: text from any saved model, with cached decoding.

The prompt is prefilled in the parallel form and the continuation decoded one token at a time
against the per-layer state (neotron/arch/decode.py: KV caches for attention, recurrent states
for the linear mixers). Greedy at temperature 0; otherwise sampled from
softmax(logits / temperature) restricted to the nucleus (top-p: the most probable tokens whose
mass first reaches p; Holtzman et al., "The Curious Case of Neural Text Degeneration",
arXiv 1904.09751), from a torch.Generator seeded with --seed. Stops at EOS or after
--max-new-tokens.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from neotron.errors import UsageError

GENERATE_HELP = ("continue a prompt with a saved model (run dir, checkpoint, or export), "
                 "with a KV cache / recurrent state")


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [B, V] -> the sampling distribution [B, V] (fp64): softmax at `temperature`,
    zero outside the smallest set of most probable tokens with mass >= top_p, renormalized."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
    keep_sorted = before < top_p  # the first token always stays (before = 0 < top_p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else a nucleus sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = nucleus_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def generate(model: nn.Module, tokens: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> torch.Tensor:
    """tokens [B, T] (equal-length prompts) -> the new tokens [B, n <= max_new_tokens]. A row
    that has produced `eos_id` keeps it as padding; generation stops when every row has."""
    from neotron.arch.decode import prefill, step

    check_sampling(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[torch.Tensor] = []
    if max_new_tokens == 0:
        return tokens.new_zeros(tokens.shape[0], 0)
    logits, state = prefill(model, tokens)
    logits = logits[:, -1]
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        nxt = next_token(logits.float(), temperature, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done = done | (nxt == eos_id)
        out.append(nxt)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits, state = step(model, nxt, state)
    return torch.stack(out, dim=1)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run directory, checkpoint directory, or `neotron convert`"
                   " / --format hf export")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples from softmax(logits / T)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the prompt followed by its continuation (EOS not printed)."""
    from neotron.hf.load import load_model

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    model = load_model(args.path, device=args.device)
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{args.path}: no tokenizer found to encode the prompt")
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt encodes to no tokens: give some text")
    new = generate(model, torch.tensor([ids]), args.max_new_tokens, args.temperature,
                   args.top_p, args.seed, tok.eos_id)[0].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    # decoded together, so a token that merges with the prompt's last one decodes as it would
    continuation = tok.decode(ids + new)[len(tok.decode(ids)):]
    print(args.prompt + continuation)
    return 0
