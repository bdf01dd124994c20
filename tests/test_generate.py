"""Cached decoding (neotron/arch/decode.py) and `neotron generate` (neotron/generate.py).

References are independent of the code under test: the model's full forward over the whole
sequence (for the cached logits and the greedy loop), and a plain-Python nucleus (top-p) set.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from torch import nn

from neotron.arch.decode import check_decodable, prefill, step
from neotron.arch.model import build_model, materialize
from neotron.config import load
from neotron.errors import UsageError
from neotron.generate import generate, nucleus_probs

# in-process `neotron.cli.main` calls need fresh logging handlers (conftest)
pytestmark = pytest.mark.usefixtures("fresh_logging")

ROOT = Path(__file__).resolve().parents[1]
DEMOS = sorted(Path(p).name for p in glob.glob(str(ROOT / "configs/demo/*.yaml")))
# Small enough for a fast CPU test; every demo's own blocks, mixers and FFNs are kept.
TINY = ["model.vocab_size=512", "data.tokenizer.vocab_size=512"]
PROMPT, NEW = 19, 18  # TTT's mini-batch is 16: a whole one prefilled, 3 stepped, 2 crossed


def _model(name: str, dtype: torch.dtype, noise: float = 0.02) -> nn.Module:
    """The demo's architecture, randomly initialized, every parameter perturbed so zero-init
    parts (per-loop LoRA B, TTT's eta offsets, biases) take part."""
    cfg = load(ROOT / "configs/demo" / name, TINY).model
    model = materialize(build_model(cfg), "cpu", seed=1).to(dtype).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _tokens(vocab: int, B: int, T: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _cached(model: nn.Module, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Logits of every position: prefill of the first n_prompt tokens, then one step each."""
    logits, state = prefill(model, tokens[:, :n_prompt])
    out = [logits]
    for t in range(n_prompt, tokens.shape[1]):
        lt, state = step(model, tokens[:, t], state)
        out.append(lt[:, None])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", DEMOS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward_fp64(name):
    model = _model(name, torch.float64)
    tokens = _tokens(model.cfg.vocab_size, 2, PROMPT + NEW)
    full = model(tokens)
    cached = _cached(model, tokens, PROMPT)
    assert full.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["hybrid.yaml", "gated_deltanet.yaml", "ttt_mlp.yaml",
                                  "relaxed_recursive.yaml"])
@pytest.mark.parametrize("n_prompt", [1, 32])
@torch.no_grad()
def test_cached_decoding_equals_full_forward_fp32(name, n_prompt):
    """fp32 at a tight tolerance; prompt lengths 1 (all stepped) and 32 (TTT: two whole
    mini-batches, no stepped tail)."""
    model = _model(name, torch.float32)
    tokens = _tokens(model.cfg.vocab_size, 2, n_prompt + 6)
    torch.testing.assert_close(_cached(model, tokens, n_prompt), model(tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama.yaml", "deltanet.yaml", "ttt_linear.yaml",
                                  "recursive_mol.yaml"])
def test_greedy_generate_equals_full_forward_loop(name):
    model = _model(name, torch.float64, noise=0.2)  # peaked logits: no near-ties in argmax
    prompt = _tokens(model.cfg.vocab_size, 2, 7)
    new = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 7:])


def _nucleus(p: list[float], top_p: float) -> set[int]:
    """Independent: the most probable tokens, in order, until their mass reaches top_p."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += p[i]
        if mass >= top_p:
            break
    return kept


def test_nucleus_probs_against_independent_set():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for temperature in (0.7, 1.0, 1.5):
        for top_p in (0.05, 0.5, 0.9, 1.0):
            got = nucleus_probs(logits, temperature, top_p)
            for row, lg in zip(got, logits):
                e = [float(x) for x in (lg / temperature).exp()]
                p = [x / sum(e) for x in e]
                keep = _nucleus(p, top_p)
                z = sum(p[i] for i in keep)
                want = [p[i] / z if i in keep else 0.0 for i in range(len(p))]
                torch.testing.assert_close(row, torch.tensor(want, dtype=torch.float64),
                                           rtol=1e-12, atol=1e-15)


def test_sampling_is_seeded_and_stays_in_the_nucleus():
    model = _model("hybrid.yaml", torch.float64, noise=0.1)
    prompt = _tokens(model.cfg.vocab_size, 1, 5)
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.6)
    a = generate(model, prompt, seed=7, **kw)
    assert torch.equal(a, generate(model, prompt, seed=7, **kw))
    assert not torch.equal(a, generate(model, prompt, seed=8, **kw))
    assert not torch.equal(a, generate(model, prompt, temperature=0.0, max_new_tokens=16))
    seq = torch.cat([prompt, a], dim=1)
    with torch.no_grad():
        logits = model(seq)[0, 4:-1] / 0.8  # the distribution each new token was drawn from
    for t, lg in zip(a[0].tolist(), logits):
        p = torch.softmax(lg, -1).tolist()
        assert t in _nucleus(p, 0.6)


def test_generate_stops_at_eos():
    model = _model("llama.yaml", torch.float64, noise=0.2)
    prompt = _tokens(model.cfg.vocab_size, 1, 6)
    free = generate(model, prompt, max_new_tokens=8)
    eos = int(free[0, 3])  # pretend the 4th greedy token is EOS
    stopped = generate(model, prompt, max_new_tokens=8, eos_id=eos)
    first = free[0].tolist().index(eos)
    assert stopped[0].tolist() == free[0, :first + 1].tolist()


def test_unsupported_mixer_is_refused():
    model = _model("llama.yaml", torch.float32)

    class Opaque(nn.Module):
        def forward(self, x, seq):
            return x

    model.layers[1].mixer = Opaque()
    with pytest.raises(UsageError, match="'Opaque' mixer \\(model layer 1\\)"):
        check_decodable(model)


def _main(*argv: str) -> int:
    """`neotron ...` in-process (the module's tests run with conftest's `fresh_logging`)."""
    from neotron.cli import main

    return main([str(a) for a in argv])


def test_cli_prints_prompt_and_continuation(trained_run, capsys):
    import neotron

    assert _main("generate", trained_run, "--prompt", "To be, or not", "--max-new-tokens",
                 "6") == 0
    out = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    # independent: greedy over full forwards of the loaded model, decoded with its tokenizer
    model = neotron.load_model(trained_run)
    tok = model.tokenizer
    ids = tok.encode("To be, or not")
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            seq.append(nxt)
    assert out == "To be, or not" + tok.decode(seq)[len(tok.decode(ids)):]
    assert len(seq) > len(ids)

    assert _main("generate", trained_run, "--prompt", "x", "--top-p", "0") == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["hybrid.yaml", "ttt_mlp.yaml"])
def test_hf_generate_uses_the_cache(name, monkeypatch):
    """transformers' generate on NeotronForCausalLM: one prefill, then one cached step per new
    token, and the tokens of an independent greedy loop over full forwards."""
    import neotron.arch.decode as decode
    from neotron.hf.modeling import NeotronConfig, NeotronForCausalLM

    cfg = load(ROOT / "configs/demo" / name, TINY).model
    hf = NeotronForCausalLM(NeotronConfig(neotron=cfg.model_dump(mode="json"),
                                          vocab_size=cfg.vocab_size)).eval()
    hf.model.load_state_dict(_model(name, torch.float32, noise=0.2).state_dict())
    calls = {"prefill": 0, "step": 0}
    for fn in ("prefill", "step"):
        real = getattr(decode, fn)

        def counted(*a, _real=real, _fn=fn, **k):
            calls[_fn] += 1
            return _real(*a, **k)

        monkeypatch.setattr(decode, fn, counted)
    prompt = _tokens(cfg.vocab_size, 2, 5)
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, hf.model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert calls == {"prefill": 1, "step": 5}
