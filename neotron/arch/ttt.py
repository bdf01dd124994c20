"""TTT-Linear and TTT-MLP sequence mixers (Sun et al., "Learning to (Learn at Test Time): RNNs
with Expressive Hidden States", arXiv 2407.04620).

The hidden state of each head is the weights of a small inner model f(x) = x + LN(g(x)),
g linear (TTT-Linear) or a GELU MLP with 4x hidden width (TTT-MLP), trained online by
mini-batch gradient descent on 1/2 || LN(g(k_t)) - (v_t - k_t) ||^2, and read out at q_t.
The layer around the inner loop follows the paper's Transformer-backbone TTT layer:

    q, k, v = W_q x, W_k x, W_v x            per head of width d (optional short conv on q, k)
    q, k = RoPE(q, k) at position (index within the mini-batch)     [the official code uses
                                                                     position_ids % mini_batch]
        (pairs rotate-half by default; `rope_pairs: interleaved` is the official layout)
    lr_t = base_lr * sigmoid(theta_lr . x_t + b_lr) / d              per head
    eta[i, j] = max(1 / (i + 1) + token_eta_offset_i, 0) * lr_j      i, j within a mini-batch
    z = inner_loop(q, k, v, eta; W0, b0, inner LN)                   neotron.kernels.ttt
    y = W_o [LayerNorm(z) * (GELU(W_g x) if use_gate)]

Learnable: the projections, theta_lr / b_lr, the inner model's initial weights (W0, b0 or
W1, b1, W2, b2, per head), the inner LayerNorm (per head) and the token_eta offsets.

`rope_pairs: interleaved` and `init: reference` give the official code's RoPE layout (to load
its weights) and initialization; docs/mixers.md lists the differences.

Training runs the mini-batch dual form (neotron.kernels.ttt). Decoding (`step`) runs the primal
form one token at a time: it keeps the weights at the start of the current mini-batch and the
running sum of lr_j * grad_j, which reproduces the dual form exactly. With document masking
every document is laid out so that it starts on a mini-batch boundary (padding after each
document's last partial mini-batch) and the inner weights restart from their learnable
initial values at each document start, which is exactly running the documents one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.conv import ShortConv
from neotron.arch.deltanet import init_normal
from neotron.arch.linear import make_linear
from neotron.arch.registry import MIXERS, LayerConfig
from neotron.arch.rope import apply_rope, apply_rope_interleaved, rope_angles
from neotron.kernels.ttt import ttt_eta, ttt_linear, ttt_mlp
from neotron.kernels.ttt.dual import gelu_tanh, gelu_tanh_grad, layer_norm, layer_norm_l2_grad

Tensor = torch.Tensor

INNER_EPS = 1e-6  # the inner LayerNorm's epsilon (official: 1e-6)
POST_EPS = 1e-6  # the post-norm LayerNorm's epsilon (official: 1e-6)


class TTTLinearConfig(LayerConfig):
    type: Literal["ttt_linear"] = "ttt_linear"
    n_heads: int = Field(default=8, gt=0)
    head_dim: int | None = Field(default=None, gt=0, description="None = dim // n_heads")
    mini_batch_size: int = Field(default=16, gt=0, description="tokens per inner GD step")
    base_lr: float = Field(default=1.0, gt=0, description="inner learning-rate scale")
    rope: bool = Field(default=True, description="RoPE on q/k at the index within the mini-batch")
    rope_theta: float = Field(default=10000.0, gt=0)
    rope_pairs: Literal["half", "interleaved"] = Field(
        default="half",
        description="RoPE pairs: 'half' rotates (x_i, x_{i+d/2}) (neotron); 'interleaved' rotates"
        " (x_2i, x_2i+1), the official TTT code's layout: set it to load official weights",
    )
    conv_size: int = Field(default=0, ge=0, description="short causal conv on q and k; 0 = none")
    use_gate: bool = Field(default=False, description="output gate GELU(W_g x)")
    impl: Literal["auto", "dual", "reference"] = "auto"
    init: Literal["neotron", "reference"] = Field(
        default="neotron",
        description="neotron: projections N(0, init_std) truncated, W_o depth-scaled (out_std);"
        " reference (official ttt-lm-pytorch `_init_weights`): every projection, W_o included,"
        " N(0, init_std) untruncated",
    )

    def check(self, dim: int) -> list[tuple[str, str]]:
        """Problems that depend on the model width, as (key, message) pairs."""
        errors = []
        if self.head_dim is None and dim % self.n_heads:
            errors.append(("n_heads", f"model.dim={dim} is not divisible by n_heads={self.n_heads}"))
        hd = self.head_dim or dim // self.n_heads
        if self.rope and hd % 2:
            errors.append(("head_dim", f"head_dim={hd} must be even for RoPE"))
        return errors


class TTTMLPConfig(TTTLinearConfig):
    type: Literal["ttt_mlp"] = "ttt_mlp"  # type: ignore[assignment]
    base_lr: float = Field(default=0.1, gt=0, description="inner learning-rate scale")
    mlp_ratio: int = Field(default=4, gt=0, description="inner MLP hidden width / head_dim")


def _rope64(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rope's rotate-half rotation without the fp32 round trip. x: [B, T, H, D]."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class DocLayout:
    """Documents of a packed batch, each moved to start on a mini-batch boundary of its row."""

    length: int  # padded row length M (a multiple of the mini-batch size)
    dest: Tensor  # [B*T]: flat position in [B*M] of every token
    resets: dict[int, Tensor]  # mini-batch n > 0 -> [B] bool, rows where a document starts

    @classmethod
    def build(cls, cu_seqlens: Tensor, batch: int, time: int, b: int) -> DocLayout:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        fill = [0] * batch  # padded length used so far in each row
        placed = []  # (row, offset in row, start, length) per non-empty document
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e == s:
                continue
            r = s // time
            placed.append((r, fill[r], s, e - s))
            fill[r] += -(-(e - s) // b) * b
        M = max(fill)
        dev = cu_seqlens.device
        base = torch.tensor([r * M + o - s for r, o, s, _ in placed], dtype=torch.long)
        lens = torch.tensor([n for *_, n in placed], dtype=torch.long)
        dest = torch.arange(batch * time) + base.repeat_interleave(lens)
        resets: dict[int, Tensor] = {}
        for r, o, _, _ in placed:
            if o > 0:
                resets.setdefault(o // b, torch.zeros(batch, dtype=torch.bool))[r] = True
        return cls(M, dest.to(dev), {n: m.to(dev) for n, m in sorted(resets.items())})

    def scatter(self, x: Tensor) -> Tensor:
        """[B, T, ...] -> [B, M, ...], zeros in the padding."""
        B, T = x.shape[:2]
        flat = x.reshape(B * T, *x.shape[2:])
        out = flat.new_zeros(B * self.length, *x.shape[2:]).index_copy(0, self.dest, flat)
        return out.view(B, self.length, *x.shape[2:])

    def gather(self, y: Tensor, time: int) -> Tensor:
        """[B, M, ...] -> [B, T, ...]."""
        B = y.shape[0]
        flat = y.reshape(B * self.length, *y.shape[2:]).index_select(0, self.dest)
        return flat.view(B, time, *y.shape[2:])


class _TTT(nn.Module):
    """The shared outer layer; subclasses define the inner model."""

    n_inner: int  # number of inner parameter tensors
    inner_bias_names: tuple[str, ...]

    def __init__(self, ctx: BuildContext, *, cfg: TTTLinearConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        H = self.n_heads = cfg.n_heads
        d = self.head_dim = cfg.head_dim or ctx.dim // cfg.n_heads
        self.b = cfg.mini_batch_size
        lin = ctx.linear
        self.wq = make_linear(ctx.dim, H * d, lin)
        self.wk = make_linear(ctx.dim, H * d, lin)
        self.wv = make_linear(ctx.dim, H * d, lin)
        self.wlr = make_linear(ctx.dim, H, lin, bias=True)  # theta_lr, b_lr
        self.wg = make_linear(ctx.dim, H * d, lin) if cfg.use_gate else None
        self.wo = make_linear(H * d, ctx.dim, lin)
        if cfg.conv_size:
            self.q_conv = ShortConv(H * d, cfg.conv_size, silu=False)
            self.k_conv = ShortConv(H * d, cfg.conv_size, silu=False)
        else:
            self.q_conv = self.k_conv = None
        self.ttt_norm_weight = nn.Parameter(torch.empty(H, d))
        self.ttt_norm_bias = nn.Parameter(torch.empty(H, d))
        self.token_eta_offset = nn.Parameter(torch.empty(self.b))
        self.post_norm = nn.LayerNorm(H * d, eps=POST_EPS)
        self._make_inner(H, d)
        # Norm parameters and biases: AdamW without weight decay (neotron.optim.routing reads
        # this module attribute; the inner weights W stay in its default "adamw" role).
        self._neotron_param_groups = {
            name: "no_decay"
            for name in ("ttt_norm_weight", "ttt_norm_bias", "token_eta_offset", *self.inner_bias_names)
        }

    def _make_inner(self, heads: int, head_dim: int) -> None:
        """Create the inner model's initial weights (per head)."""
        raise NotImplementedError

    def inner_params(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _projections(self) -> list[nn.Module]:
        return [m for m in (self.wq, self.wk, self.wv, self.wlr, self.wg) if m is not None]

    def _convs(self) -> list[ShortConv]:
        return [c for c in (self.q_conv, self.k_conv) if c is not None]

    def init_weights(self) -> None:
        if self.cfg.init == "reference":
            # test-time-training/ttt-lm-pytorch@cd831db10c ttt.py: TTTPreTrainedModel's
            # _init_weights sets every nn.Linear to N(0, initializer_range), bias 0; the lr gate
            # is N(0, 0.02), bias 0; the convs (nn.Conv1d) keep torch's default, as here.
            for proj in (*self._projections(), self.wo):
                init_normal(proj, self.ctx.init_std)
        else:
            for proj in self._projections():
                proj.init_weights(self.ctx.init_std)
            self.wo.init_weights(self.ctx.out_std)
        for conv in self._convs():
            conv.init_weights()
        with torch.no_grad():
            self.ttt_norm_weight.fill_(1.0)
            self.ttt_norm_bias.zero_()
            self.token_eta_offset.zero_()
            self.post_norm.reset_parameters()
            self._init_inner()

    def _init_inner(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- pieces

    def token_eta(self) -> Tensor:
        """[b]: 1/(i+1) + learnable offset, clamped at 0 (the official token_idx scaling)."""
        idx = torch.arange(1, self.b + 1, device=self.token_eta_offset.device)
        return (1.0 / idx + self.token_eta_offset).clamp_min(0.0)

    def lr(self, x: Tensor) -> Tensor:
        """Per-token, per-head inner learning rate [..., H] in fp32."""
        a = self.wlr(x)
        a = a if a.dtype == torch.float64 else a.float()
        return self.cfg.base_lr * torch.sigmoid(a) / self.head_dim

    def _rope(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        if not self.cfg.rope:
            return q, k
        cos, sin = rope_angles(pos, self.head_dim, self.cfg.rope_theta)
        if self.cfg.rope_pairs == "interleaved":  # computes in fp32, or fp64 for fp64 inputs
            if q.dtype == torch.float64:
                cos, sin = cos.double(), sin.double()
            return apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin)
        if q.dtype == torch.float64:  # apply_rope computes in fp32; keep fp64 for exact tests
            cos, sin = cos.double(), sin.double()
            return _rope64(q, cos, sin), _rope64(k, cos, sin)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def _output(self, z: Tensor, x: Tensor) -> Tensor:
        """z [..., H*d] -> post-norm, gate, output projection."""
        z = self.post_norm(z)
        if self.wg is not None:
            z = z * F.gelu(self.wg(x), approximate="tanh")
        return self.wo(z)

    def _kernel(self, q, k, v, eta, **kw) -> tuple[Tensor, Any]:
        fn = ttt_linear if self.n_inner == 2 else ttt_mlp
        return fn(q, k, v, eta, *self.inner_params(), self.ttt_norm_weight, self.ttt_norm_bias,
                  mini_batch_size=self.b, eps=INNER_EPS, impl=self.cfg.impl, **kw)

    # --------------------------------------------------------------- forward

    def forward(self, x: Tensor, seq: SeqInfo) -> Tensor:
        return self._mix(x, seq)[0]

    def _mix(self, x: Tensor, seq: SeqInfo, final: bool = False) -> tuple[Tensor, Any]:
        """(y, the inner weights after the last token if `final`; one document per row)."""
        B, T, _ = x.shape
        H, d, b = self.n_heads, self.head_dim, self.b
        doc = seq.doc_ids
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.q_conv is not None:
            q, k = self.q_conv(q, doc), self.k_conv(k, doc)
        lr = self.lr(x)
        layout = None if seq.cu_seqlens is None else DocLayout.build(seq.cu_seqlens, B, T, b)
        if layout is not None:
            q, k, v, lr = (layout.scatter(t) for t in (q, k, v, lr))
        L = q.shape[1]
        q, k, v = (t.view(B, L, H, d) for t in (q, k, v))
        # RoPE at the index within the mini-batch: every mini-batch (and every document, laid
        # out on mini-batch boundaries) sees the same phases.
        q, k = self._rope(q, k, torch.arange(L, device=x.device) % b)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
        eta = ttt_eta(self.token_eta(), lr.transpose(1, 2), b)
        final_state = None
        if layout is None:
            z, final_state = self._kernel(q, k, v, eta, output_final_state=final)
        else:
            z = self._segments(q, k, v, eta, layout)
        z = z.transpose(1, 2).reshape(B, L, H * d)
        if layout is not None:
            z = layout.gather(z, T)
        return self._output(z, x), final_state

    def _segments(self, q, k, v, eta, layout: DocLayout) -> Tensor:
        """The inner loop over a document layout: one kernel call per run of mini-batches with
        no document start, the inner weights of the rows that start a document reset to their
        initial values between runs."""
        B, b = q.shape[0], self.b
        N = layout.length // b
        cuts = [0, *layout.resets, N]
        runs = [n1 - n0 for n0, n1 in zip(cuts[:-1], cuts[1:])]
        # split, not slicing: one backward node for all pieces instead of one full-size zero
        # gradient per piece (quadratic in the number of documents).
        qs, ks, vs = (t.split([r * b for r in runs], dim=2) for t in (q, k, v))
        etas = eta.split(runs, dim=2)
        outs, state = [], None
        for i, n0 in enumerate(cuts[:-1]):
            init = None
            if n0 > 0:
                m = layout.resets[n0].view(B, 1, 1, 1)
                init = tuple(
                    torch.where(m, p.to(s.dtype).expand(s.shape), s)
                    for p, s in zip(self.inner_params(), state)
                )
            z, state = self._kernel(qs[i], ks[i], vs[i], etas[i], initial_state=init,
                                    output_final_state=cuts[i + 1] < N)
            outs.append(z)
        return torch.cat(outs, dim=2)

    # -------------------------------------------------------------- decoding

    def _cdt(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def init_state(self, batch: int, *, device=None, dtype=None) -> dict[str, Any]:
        """Decoding state at the start of a sequence: the inner weights at the start of the
        current mini-batch ("params", [B, H, ...] in fp32 / fp64), the running sums of
        lr_j * grad_j over the mini-batch so far ("acc"), the index in the mini-batch ("i"),
        and the convolutions' last inputs."""
        dtype = dtype or self.ttt_norm_weight.dtype
        cdt = self._cdt(dtype)
        params = tuple(
            p.detach().to(device=device, dtype=cdt).expand(batch, *p.shape).clone()
            for p in self.inner_params()
        )
        state: dict[str, Any] = {
            "params": params,
            "acc": tuple(torch.zeros_like(p) for p in params),
            "i": 0,
        }
        for name, conv in (("q", self.q_conv), ("k", self.k_conv)):
            if conv is not None:
                state[f"conv_{name}"] = conv.init_state(batch, device=device, dtype=dtype)
        return state

    def step(self, x_t: Tensor, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """One decoding step: x_t [B, dim] -> (y_t [B, dim], new state); primal form:
        every gradient of a mini-batch is taken at its starting weights theta_0, and token i
        reads theta_i = theta_0 - token_eta_i * sum_{j <= i} lr_j grad_j."""
        B = x_t.shape[0]
        H, d, b = self.n_heads, self.head_dim, self.b
        i = state["i"]
        new: dict[str, Any] = {}
        q, k, v = self.wq(x_t), self.wk(x_t), self.wv(x_t)
        if self.q_conv is not None:
            q, new["conv_q"] = self.q_conv.step(q, state["conv_q"])
            k, new["conv_k"] = self.k_conv.step(k, state["conv_k"])
        q, k, v = (t.view(B, 1, H, d) for t in (q, k, v))
        q, k = self._rope(q, k, torch.tensor([i], device=x_t.device))
        cdt = self._cdt(x_t.dtype)
        q, k, v = (t.transpose(1, 2).to(cdt) for t in (q, k, v))  # [B, H, 1, d]
        lw = self.ttt_norm_weight.to(cdt).view(1, H, 1, d)
        lb = self.ttt_norm_bias.to(cdt).view(1, H, 1, d)
        lr = self.lr(x_t).to(cdt)[:, :, None, None]  # [B, H, 1, 1]
        theta0 = state["params"]
        grads = self.token_grads(k, v, theta0, lw, lb)
        acc = tuple(a + lr * g for a, g in zip(state["acc"], grads))
        te = self.token_eta()[i].to(cdt)
        theta = tuple(p - te * a for p, a in zip(theta0, acc))
        z = q + layer_norm(self.inner(q, theta), lw, lb, INNER_EPS)  # [B, H, 1, d]
        if i == b - 1:  # mini-batch done: its last weights start the next one
            new.update(params=theta, acc=tuple(torch.zeros_like(a) for a in acc), i=0)
        else:
            new.update(params=theta0, acc=acc, i=i + 1)
        z = z.to(x_t.dtype).reshape(B, H * d)
        return self._output(z, x_t), new

    def prefill(self, x: Tensor, seq: SeqInfo) -> tuple[Tensor, dict[str, Any]]:
        """The prompt (one document per row): its whole mini-batches through the dual-form
        kernel, whose final inner weights start the `step` state; the last T mod b tokens (a
        mini-batch in progress, which the state holds as running sums) are stepped."""
        B, T, _ = x.shape
        n = T - T % self.b
        state = self.init_state(B, device=x.device, dtype=x.dtype)
        ys = []
        if n:
            y, theta = self._mix(x[:, :n], seq, final=True)
            ys.append(y)
            state["params"] = tuple(t.to(p.dtype) for t, p in zip(theta, state["params"]))
            for name, proj, conv in (("q", self.wq, self.q_conv), ("k", self.wk, self.k_conv)):
                if conv is not None:
                    start = max(0, n - conv.kernel_size + 1)
                    state[f"conv_{name}"] = conv.state_after(proj(x[:, start:n]))
        for t in range(n, T):
            y_t, state = self.step(x[:, t], state)
            ys.append(y_t[:, None])
        return torch.cat(ys, dim=1), state

    def token_grads(self, k, v, theta, lw, lb) -> tuple[Tensor, ...]:
        """Gradients of the inner loss of one token w.r.t. each inner parameter at theta."""
        raise NotImplementedError

    def inner(self, x: Tensor, theta: tuple[Tensor, ...]) -> Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- FLOPs

    def minibatch_flops(self, m: int) -> tuple[float, float]:
        """(forward FLOPs of the dual form over one mini-batch of m tokens and one head,
        the part of them that is the inner weights' update); matmuls only."""
        raise NotImplementedError

    def inner_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) of the inner loop per token and head, over one
        document of seq_len tokens in mini-batches of b (the last one shorter). Backward is
        twice the forward, except for the last mini-batch's weight update, which feeds
        nothing in training (its forward runs, autograd has nothing to send back)."""
        sizes = [min(self.b, seq_len - s) for s in range(0, seq_len, self.b)]
        fwd = sum(self.minibatch_flops(m)[0] for m in sizes)
        return (3.0 * fwd - 2.0 * self.minibatch_flops(sizes[-1])[1]) / seq_len

    def flops_per_token(self, seq_len: int) -> float:
        proj = sum(m.flops_per_token(seq_len) for m in (*self._projections(), self.wo))
        conv = sum(c.flops_per_token() for c in self._convs())
        return proj + conv + self.n_heads * self.inner_flops_per_token(seq_len)


@MIXERS.register(TTTLinearConfig)
class TTTLinear(_TTT):
    n_inner = 2
    inner_bias_names = ("b0",)

    def _make_inner(self, H: int, d: int) -> None:
        self.W0 = nn.Parameter(torch.empty(H, d, d))
        self.b0 = nn.Parameter(torch.empty(H, 1, d))

    def inner_params(self) -> tuple[Tensor, ...]:
        return (self.W0, self.b0)


    def _init_inner(self) -> None:
        nn.init.normal_(self.W0, std=self.ctx.init_std)  # official: N(0, 0.02)
        nn.init.zeros_(self.b0)

    def token_grads(self, k, v, theta, lw, lb):
        W, b = theta
        gz = layer_norm_l2_grad(k @ W + b, v - k, lw, lb, INNER_EPS)
        return (k.transpose(-1, -2) @ gz, gz)

    def inner(self, x, theta):
        W, b = theta
        return x @ W + b

    def minibatch_flops(self, m: int) -> tuple[float, float]:
        """m tokens, head width d: K W0, Q W0 and the W update are 3 x 2 m d^2; tril(Q K^T),
        (eta * Q K^T) G and tril(eta) G are 3 x 2 m^2 d."""
        d = self.head_dim
        return 6.0 * m * d * d + 6.0 * m * m * d, 2.0 * m * d * d


@MIXERS.register(TTTMLPConfig)
class TTTMLP(_TTT):
    n_inner = 4
    inner_bias_names = ("b1", "b2")

    def _make_inner(self, H: int, d: int) -> None:
        D = self.cfg.mlp_ratio * d
        self.W1 = nn.Parameter(torch.empty(H, d, D))
        self.b1 = nn.Parameter(torch.empty(H, 1, D))
        self.W2 = nn.Parameter(torch.empty(H, D, d))
        self.b2 = nn.Parameter(torch.empty(H, 1, d))

    def inner_params(self) -> tuple[Tensor, ...]:
        return (self.W1, self.b1, self.W2, self.b2)


    def _init_inner(self) -> None:
        nn.init.normal_(self.W1, std=self.ctx.init_std)
        nn.init.zeros_(self.b1)
        nn.init.normal_(self.W2, std=self.ctx.init_std)
        nn.init.zeros_(self.b2)

    def token_grads(self, k, v, theta, lw, lb):
        W1, b1, W2, b2 = theta
        z1 = k @ W1 + b1
        x2 = gelu_tanh(z1)
        gz2 = layer_norm_l2_grad(x2 @ W2 + b2, v - k, lw, lb, INNER_EPS)
        gz1 = (gz2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1)
        return (k.transpose(-1, -2) @ gz1, gz1, x2.transpose(-1, -2) @ gz2, gz2)

    def inner(self, x, theta):
        W1, b1, W2, b2 = theta
        return gelu_tanh(x @ W1 + b1) @ W2 + b2

    def minibatch_flops(self, m: int) -> tuple[float, float]:
        """m tokens, head width d, hidden D: seven m x d x D matmuls (K W1, X2 W2, the
        backprop G2 W2^T, Q W1, X2bar W2, the W1 and W2 updates) = 14 m d D; six m x m
        products (Q K^T, X2bar X2^T, and eta-weighted sums of G1 and G2) = 2 m^2 (3 d + 3 D)."""
        d = self.head_dim
        D = self.cfg.mlp_ratio * d
        return 14.0 * m * d * D + 6.0 * m * m * (d + D), 4.0 * m * d * D
