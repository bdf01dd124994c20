"""The dense baseline against plain references, and the builder's contracts."""

import math

import pytest
import torch
import torch.nn.functional as F

from neotron.arch import MIXERS, ModelConfig, build_model, materialize
from neotron.arch.attention import Attention, AttentionConfig
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.rope import apply_rope, rope_angles


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=48, n_layers=3,
                blocks={"attention": {"mixer": {"type": "attention", "n_heads": 6,
                                                "n_kv_heads": 2}}})
    base.update(kw)
    return ModelConfig.model_validate(base)


def make_attention(dim=32, n_heads=4, n_kv_heads=2, dtype=torch.float64) -> Attention:
    ctx = BuildContext(dim=dim, layer_idx=0, n_layers=2, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.2)
    attn = Attention(ctx, cfg=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads))
    torch.manual_seed(0)
    attn.init_weights()
    return attn.to(dtype)


def naive_attention(attn: Attention, x: torch.Tensor, doc_ids=None) -> torch.Tensor:
    """Explicit GQA: repeat kv heads, masked softmax, no SDPA."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.wq(x).view(B, T, attn.n_heads, hd)
    k = attn.wk(x).view(B, T, attn.n_kv_heads, hd)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, hd)
    cos, sin = rope_angles(torch.arange(T), hd, attn.cfg.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, -1)
    return attn.wo(out)


def test_gqa_attention_matches_naive_reference_fp64():
    attn = make_attention()
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x, SeqInfo(positions=torch.arange(11)))
    ref = naive_attention(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g_out = torch.autograd.grad(out.sum(), [x, attn.wq.weight])
    g_ref = torch.autograd.grad(ref.sum(), [x, attn.wq.weight])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_document_mask_equals_separate_documents():
    attn = make_attention()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = attn(x, SeqInfo(positions=torch.arange(10), doc_ids=doc_ids))
    torch.testing.assert_close(out, naive_attention(attn, x, doc_ids), rtol=1e-10, atol=1e-10)
    first = attn(x[:, :4], SeqInfo(positions=torch.arange(4)))
    torch.testing.assert_close(out[:, :4], first, rtol=1e-10, atol=1e-10)


def test_rope_scores_depend_only_on_relative_position():
    hd = 16
    q, k = torch.randn(1, 1, 1, hd, dtype=torch.float64), torch.randn(1, 1, 1, hd,
                                                                       dtype=torch.float64)

    def score(i, j):
        ci, si = rope_angles(torch.tensor([i]), hd, 10000.0)
        cj, sj = rope_angles(torch.tensor([j]), hd, 10000.0)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum()

    torch.testing.assert_close(score(7, 3), score(14, 10), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_build_on_meta_then_materialize_is_deterministic():
    cfg = small_cfg()
    meta = build_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    a = materialize(build_model(cfg), "cpu", seed=3)
    b = materialize(build_model(cfg), "cpu", seed=3)
    c = materialize(build_model(cfg), "cpu", seed=4)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.embed.weight, c.embed.weight)
    # residual output projections are scaled down with depth
    assert a.layers[0].mixer.wo.weight.std() < 0.6 * a.layers[0].mixer.wq.weight.std()


def test_causal_lm_is_causal_and_tied_embeddings_share_weights():
    model = materialize(build_model(small_cfg(tie_embeddings=True)), "cpu", seed=0)
    assert model.head is None
    tokens = torch.randint(0, 97, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 97)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8])
    logits.sum().backward()
    assert model.embed.weight.grad is not None


def test_flops_per_token_matches_measured(monkeypatch):
    """FlopCounterMode over forward + backward (SDPA counted over the causal pairs, as in
    tests/test_flops_measured.py), at a length that is not a power of two."""
    from tests.test_flops_measured import measure

    model = materialize(build_model(small_cfg()), "cpu", seed=0)
    T = 37
    tokens = torch.randint(0, 97, (2, T))
    measured = measure(lambda: model(tokens).sum().backward(), monkeypatch) / (2 * T)
    assert measured == pytest.approx(model.flops_per_token(T), rel=1e-9)


def test_hybrid_pattern_repeats_over_depth():
    cfg = ModelConfig.model_validate(dict(
        vocab_size=50, dim=32, n_layers=5,
        blocks={"wide": {"mixer": {"type": "attention", "n_heads": 4}},
                "narrow": {"mixer": {"type": "attention", "n_heads": 2}}},
        pattern=["wide", "wide", "narrow"]))
    model = build_model(cfg)
    assert [layer.mixer.n_heads for layer in model.layers] == [4, 4, 2, 4, 4]


def test_unknown_pattern_name_and_registry_lookup():
    with pytest.raises(ValueError, match="unknown block 'nope'"):
        small_cfg(pattern=["nope"])
    with pytest.raises(KeyError, match="allowed: attention"):
        MIXERS.get("mamba")


def test_trains_a_few_steps_on_a_fixed_batch():
    model = materialize(build_model(small_cfg()), "cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_seqinfo_from_eos_restarts_documents():
    eos = 0
    tokens = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 3], [0, 1, 2, 3, 4, 5, 6, 7]])
    seq = SeqInfo.for_tokens(tokens, eos)
    assert seq.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert seq.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    plain = SeqInfo.for_tokens(tokens)
    assert plain.doc_ids is None and plain.positions.tolist() == list(range(8))


def test_document_masked_model_equals_documents_run_apart():
    model = materialize(build_model(small_cfg()), "cpu", seed=0).double()
    eos = 0
    doc_a, doc_b = torch.tensor([5, 6, 7, 0]), torch.tensor([8, 9, 10, 11, 12])
    packed = torch.cat([doc_a, doc_b])[None]
    out = model(packed, SeqInfo.for_tokens(packed, eos))
    torch.testing.assert_close(out[:, :4], model(doc_a[None]))
    torch.testing.assert_close(out[:, 4:], model(doc_b[None]))
