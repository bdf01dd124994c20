"""Forward+backward time and peak memory of the parameter-memory layers against a dense layer
of the same input and output sizes, measured in one run (ratios are meaningful on a shared
machine; absolute times are not).

    OMP_NUM_THREADS=1 python bench/memory.py [--dims 256 512 1024] [--tokens 2048] [--repeats 3]

Projections (d -> d): dense linear vs MemoryFormer hash layer (tau = 8) and Pattention (n = d).
FFNs (d -> d): SwiGLU (hidden 8/3 d) vs MemoryFormer FFN (tau = 8, +2 bits), Pattention FFN
(n = 4d) and product-key memory (Memory+, 256^2 slots, 4 heads x 32 reads, k_dim 256).

Step memory: on CUDA the peak `max_memory_allocated` above what was allocated before the step;
on CPU (no allocator statistics) the activations saved for the backward (distinct storages,
parameters excluded) plus the parameters' gradients. fp32, `--tokens` tokens per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinearConfig, make_linear
from neotron.arch.memory import ProductKeyMemory, ProductKeyMemoryConfig
from neotron.arch.memoryformer import (
    MemoryFormerFFN,
    MemoryFormerFFNConfig,
    MemoryFormerLinearConfig,
)
from neotron.arch.mlp import SwiGLU, SwiGLUConfig
from neotron.arch.tokenformer import PattentionConfig, PattentionFFN, PattentionFFNConfig


def _ctx(dim: int) -> BuildContext:
    return BuildContext(dim=dim, layer_idx=0, n_layers=12, linear=DenseLinearConfig(),
                        norm_eps=1e-5, init_std=0.02)


def projections(d: int) -> dict[str, nn.Module]:
    return {
        "dense linear": make_linear(d, d, DenseLinearConfig()),
        "memoryformer": make_linear(d, d, MemoryFormerLinearConfig(tau=8)),
        "pattention": make_linear(d, d, PattentionConfig(n_tokens=d)),
    }


def ffns(d: int) -> dict[str, nn.Module]:
    ctx = _ctx(d)
    return {
        "swiglu": SwiGLU(ctx, cfg=SwiGLUConfig()),
        "memoryformer ffn": MemoryFormerFFN(ctx, cfg=MemoryFormerFFNConfig()),
        "pattention ffn": PattentionFFN(ctx, cfg=PattentionFFNConfig()),
        "pk memory": ProductKeyMemory(ctx, cfg=ProductKeyMemoryConfig(
            n_keys=256, heads=4, knn=32, k_dim=256)),
    }


def _init(m: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    if isinstance(m, (SwiGLU, MemoryFormerFFN, PattentionFFN, ProductKeyMemory)):
        m.init_weights()
    else:
        m.init_weights(0.02)
    return m


def _step_bytes(step: Callable[[], None], module: nn.Module, device: torch.device) -> float:
    """Memory one training step needs beyond the parameters and the input."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU has no allocator statistics: count what the forward saves for the backward
    # (distinct storages, parameters excluded) plus the parameters' gradients.
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type != "meta":
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    grads = sum(p.grad.untyped_storage().nbytes() for p in module.parameters()
                if p.grad is not None)
    return sum(saved.values()) + grads


def measure(module: nn.Module, d: int, tokens: int, repeats: int, device: torch.device
            ) -> tuple[float, float]:
    module = _init(module).to(device)
    x = torch.randn(4, tokens // 4, d, device=device, requires_grad=True)
    seq = SeqInfo(positions=torch.arange(tokens // 4, device=device))
    takes_seq = not hasattr(module, "in_features")

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x, seq) if takes_seq else module(x)
        y.square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    module.zero_grad(set_to_none=True)
    return statistics.median(times), _step_bytes(step, module, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, fp32,"
          f" {args.tokens} tokens per step")
    head = (f"{'d':>5} {'layer':<17}{'params':>10}{'MFLOP/tok':>11}{'fwd+bwd ms':>12}"
            f"{'x ref':>7}{'step MiB':>10}{'x ref':>7}")
    print(head)
    for d in args.dims:
        for group in (projections(d), ffns(d)):
            ref_t = ref_m = None
            for name, module in group.items():
                params = sum(p.numel() for p in module.parameters())
                flops = module.flops_per_token(args.tokens) / 1e6
                t, mem = measure(module, d, args.tokens, args.repeats, device)
                ref_t, ref_m = ref_t or t, ref_m or mem
                print(f"{d:>5} {name:<17}{params / 1e6:>9.2f}M{flops:>11.2f}{t * 1e3:>12.1f}"
                      f"{t / ref_t:>6.2f}x{mem / 2**20:>10.1f}{mem / ref_m:>6.2f}x")
                del module


if __name__ == "__main__":
    main()
