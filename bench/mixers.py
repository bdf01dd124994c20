"""Forward+backward time of the linear-time mixers, against their references and against attention.

    OMP_NUM_THREADS=1 python bench/mixers.py --quick        # CPU, about two minutes
    python bench/mixers.py                                  # T = 512, 2048, 8192
    python bench/mixers.py --device cuda                    # adds fla kernels and peak memory

Two tables, every number measured in the same run (so ratios are meaningful on a shared machine):

1. kernels: the fast path (chunked WY/UT delta rule, TTT dual form) against the token-by-token /
   primal references (capped in T: they are Python loops over tokens), and on CUDA against fla's
   Triton kernels when fla is installed. Batch 1, 4 heads, head dim 64, fp32 (bf16 for fla).
2. layers: each registered mixer layer (projections, convs, gates, norms included) against the
   attention layer (SDPA, causal) of the same width and heads. Batch 1, dim 512, 8 heads.

Times are the median of --repeats runs after a warm-up (a single run when one takes > 2 s).
Peak memory is torch.cuda.max_memory_allocated above the inputs, on CUDA only: CPU allocations
are not tracked by torch, and tracemalloc does not see them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from neotron.arch.attention import AttentionConfig
from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.deltanet import DeltaNetConfig, GatedDeltaNetConfig
from neotron.arch.linear import DenseLinearConfig
from neotron.arch.registry import MIXERS
from neotron.arch.ttt import TTTLinearConfig, TTTMLPConfig
from neotron.kernels.delta_rule import _load_fla, delta_rule
from neotron.kernels.gated_delta_rule import gated_delta_rule
from neotron.kernels.ttt import ttt_eta, ttt_linear, ttt_mlp

Tensor = torch.Tensor
SLOW_S = 2.0


def measure(fn: Callable[[], None], repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak bytes or nan) of fn() = one forward + backward."""

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = once()  # warm-up (allocator, first-call dispatch, Triton autotune)
    if first > SLOW_S:
        times = [first]
    else:
        times = [once() for _ in range(repeats)]
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


def fwd_bwd(run: Callable[[], Tensor | tuple], leaves: list[Tensor]) -> Callable[[], None]:
    def step() -> None:
        for x in leaves:
            x.grad = None
        out = run()
        o = out[0] if isinstance(out, tuple) else out
        o.float().square().mean().backward()

    return step


# ------------------------------------------------------------------ kernels


def kernel_inputs(name: str, T: int, device, dtype) -> tuple[list[Tensor], dict]:
    gen = torch.Generator().manual_seed(0)
    B, H, d = 1, 4, 64

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    if name in ("delta_rule", "gated_delta_rule"):
        xs = [F.normalize(rnd(B, T, H, d), dim=-1), F.normalize(rnd(B, T, H, d), dim=-1),
              rnd(B, T, H, d)]
        if name == "gated_delta_rule":
            xs.append(F.logsigmoid(rnd(B, T, H) + 3.0))
        xs.append(rnd(B, T, H).sigmoid())
        return [x.to(device, dtype).requires_grad_() for x in xs], {}
    b = 16
    q, k, v = (rnd(B, H, T, d) for _ in range(3))
    eta = ttt_eta(1.0 / torch.arange(1, b + 1), rnd(B, H, T).sigmoid() / d, b)
    if name == "ttt_linear":
        params = [rnd(H, d, d) * 0.02, torch.zeros(H, 1, d)]
    else:
        params = [rnd(H, d, 4 * d) * 0.02, torch.zeros(H, 1, 4 * d), rnd(H, 4 * d, d) * 0.02,
                  torch.zeros(H, 1, d)]
    ln = [torch.ones(H, d), torch.zeros(H, d)]
    xs = [x.to(device, dtype).requires_grad_() for x in (q, k, v, eta, *params, *ln)]
    return xs, {"mini_batch_size": b}


KERNELS: dict[str, tuple[Callable, str]] = {
    # name -> (function, fast impl)
    "delta_rule": (delta_rule, "chunked"),
    "gated_delta_rule": (gated_delta_rule, "chunked"),
    "ttt_linear": (ttt_linear, "dual"),
    "ttt_mlp": (ttt_mlp, "dual"),
}
FLA = {"delta_rule": "fla.ops.delta_rule", "gated_delta_rule": "fla.ops.gated_delta_rule"}


def bench_kernels(args, device) -> None:
    print(f"\n## kernels: forward+backward, B=1 H=4 d=64, fp32 ({device.type})")
    cols = ["kernel", "T", "reference s", "fast s", "fast vs ref"]
    if device.type == "cuda":
        cols += ["fla bf16 s", "fast vs fla", "fast MiB", "fla MiB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name, (fn, fast) in KERNELS.items():
        cap = args.ref_max_t if name.endswith("delta_rule") else args.ttt_ref_max_t
        for T in args.T:
            xs, kw = kernel_inputs(name, T, device, torch.float32)
            ref = float("nan")
            if T <= cap:
                ref, _ = measure(fwd_bwd(partial(fn, *xs, impl="reference", **kw), xs), 1, device)
            t_fast, m_fast = measure(fwd_bwd(partial(fn, *xs, impl=fast, **kw), xs),
                                     args.repeats, device)
            row = [name, str(T), f"{ref:.4f}" if ref == ref else "-", f"{t_fast:.4f}",
                   f"{ref / t_fast:.1f}x" if ref == ref else "-"]
            if device.type == "cuda":
                fla_s, fla_m = float("nan"), float("nan")
                if name in FLA and _load_fla(FLA[name], "chunk_" + name) is not None:
                    xb, _ = kernel_inputs(name, T, device, torch.bfloat16)
                    fla_s, fla_m = measure(fwd_bwd(partial(fn, *xb, impl="fla"), xb),
                                           args.repeats, device)
                row += [f"{fla_s:.4f}" if fla_s == fla_s else "n/a",
                        f"{fla_s / t_fast:.2f}x" if fla_s == fla_s else "-",
                        f"{m_fast / 2**20:.0f}", f"{fla_m / 2**20:.0f}" if fla_m == fla_m else "-"]
            print("| " + " | ".join(row) + " |", flush=True)


# ------------------------------------------------------------------- layers


def layer_configs() -> dict:
    return {
        "attention": AttentionConfig(n_heads=8),
        "deltanet": DeltaNetConfig(n_heads=8),
        "gated_deltanet": GatedDeltaNetConfig(n_heads=8),
        "ttt_linear": TTTLinearConfig(n_heads=8),
        "ttt_mlp": TTTMLPConfig(n_heads=8),
    }


def bench_layers(args, device) -> None:
    dim = 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctx = BuildContext(dim=dim, layer_idx=0, n_layers=12, linear=DenseLinearConfig(),
                       norm_eps=1e-5, init_std=0.02)
    print(f"\n## layers: forward+backward, B=1 dim={dim} 8 heads (head dim 64), "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'} ({device.type}); "
          "ratio = layer time / attention time")
    cols = ["layer", "T", "s", "vs attention", "MFLOP/token"]
    if device.type == "cuda":
        cols += ["peak MiB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    layers = {}
    for name, cfg in layer_configs().items():
        torch.manual_seed(0)
        layer = MIXERS.build(cfg, ctx).to(device)
        layer.init_weights()
        layers[name] = layer
    for T in args.T:
        x = torch.randn(1, T, dim, device=device, requires_grad=True)
        seq = SeqInfo(positions=torch.arange(T, device=device))
        base = None
        for name, layer in layers.items():
            def run(layer=layer, x=x, seq=seq):
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    return layer(x, seq)

            s, mem = measure(fwd_bwd(run, [x, *layer.parameters()]), args.repeats, device)
            base = s if name == "attention" else base
            row = [name, str(T), f"{s:.4f}", f"{s / base:.2f}x",
                   f"{layer.flops_per_token(T) / 1e6:.1f}"]
            if device.type == "cuda":
                row.append(f"{mem / 2**20:.0f}")
            print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 512, 2048 and one repeat")
    ap.add_argument("--T", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ref-max-t", type=int, default=2048,
                    help="largest T for the token-by-token delta-rule references")
    ap.add_argument("--ttt-ref-max-t", type=int, default=None,
                    help="largest T for the primal TTT references (default 2048, quick: 512)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kernels", "layers"])
    args = ap.parse_args()
    args.T = args.T or ([512, 2048] if args.quick else [512, 2048, 8192])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.ttt_ref_max_t = args.ttt_ref_max_t or (512 if args.quick else 2048)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# bench/mixers.py: torch {torch.__version__}, {name}, "
          f"{torch.get_num_threads()} CPU threads, T = {args.T}, repeats {args.repeats}")
    if "kernels" not in args.skip:
        bench_kernels(args, device)
    if "layers" not in args.skip:
        bench_layers(args, device)


if __name__ == "__main__":
    main()
