"""Optimizer benchmarks: one step of AdamW / Muon / NorMuon on a 125M-shaped model, and
Newton-Schulz throughput against a plain matmul of the same shape.

    python bench/optim.py            # 125M shape (dim 768, 12 layers, vocab 32768), minutes on CPU
    python bench/optim.py --quick    # dim 256, 4 layers, vocab 8192: seconds
    python bench/optim.py --device cuda

What is timed:

- ``step``: ``optimizer.step()`` of the optimizer ``neotron.optim.builder.build_optimizer``
  makes for ``optim.name=adamw|muon|normuon`` (routing included: Muon/NorMuon for the 84 hidden
  matrices, AdamW for embeddings, head and norms), after one untimed step that allocates the
  state; the best of ``--repeat`` steps, with fixed random gradients. "NS share" is the time
  of Newton-Schulz alone on the same matrices (a loop like the optimizer's), as a fraction of
  the Muon step.
- ``Newton-Schulz``: ``zeropower_via_newtonschulz5`` (5 quintic steps, bf16) on one fp32
  ``[rows, cols]`` matrix, against one bf16 matmul ``[m, n] @ [n, m]`` (m = min, n = max of the
  shape: the Gram product NS itself runs). NS does ``steps * (4 m^2 n + 2 m^3)`` FLOPs, that is
  ``steps * (2 + m/n)`` matmuls' worth; the printed efficiency is that FLOP ratio over the
  measured time ratio (1.0 = NS runs at the matmul's FLOP rate).

Times are the best of several runs (``--repeat``). All figures come from this script; rerun it
to check them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from neotron.arch import ModelConfig, build_model, materialize
from neotron.config import OptimConfig
from neotron.optim.builder import build_optimizer
from neotron.optim.newton_schulz import zeropower_via_newtonschulz5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Best (minimum) seconds of ``repeat`` calls after ``warmup`` untimed ones: on a shared
    machine the minimum is the reproducible figure (interference only ever adds time)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def model_config(quick: bool) -> ModelConfig:
    if quick:
        dim, layers, vocab, heads = 256, 4, 8192, 4
    else:  # configs/scaling/llama/125m.yaml's shape
        dim, layers, vocab, heads = 768, 12, 32768, 12
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=layers, max_seq_len=2048, tie_embeddings=False,
        blocks={"attention": {"mixer": {"type": "attention", "n_heads": heads},
                              "ffn": {"type": "swiglu"}}},
    )


def bench_steps(args: argparse.Namespace, device: torch.device) -> None:
    mcfg = model_config(args.quick)
    model = materialize(build_model(mcfg), device, 0)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
    print(f"model: dim {mcfg.dim}, {mcfg.n_layers} layers, vocab {mcfg.vocab_size}, "
          f"{n_params / 1e6:.1f}M parameters, fp32, {device}")
    results: dict[str, float] = {}
    matrices: list[torch.Tensor] = []
    for name in ("adamw", "muon", "normuon"):
        opt = build_optimizer(model, OptimConfig(name=name, lr=1e-12, weight_decay=0.0))
        if name == "muon":
            matrices = [p for grp in opt.param_groups if grp["algorithm"] == "muon"
                        for p in grp["params"]]
        results[name] = timeit(opt.step, device, args.repeat)
        del opt
    # Newton-Schulz alone on the same matrices: the floor of the Muon step.
    grads = [p.grad for p in matrices]
    ns_only = timeit(lambda: [zeropower_via_newtonschulz5(x) for x in grads], device, args.repeat)
    print(f"{'optimizer':<10} {'step ms':>9} {'vs AdamW':>9}")
    for name, t in results.items():
        print(f"{name:<10} {t * 1e3:>9.1f} {t / results['adamw']:>8.2f}x")
    print(f"Newton-Schulz alone on the {len(matrices)} Muon matrices: {ns_only * 1e3:.1f} ms "
          f"= {ns_only / results['muon']:.0%} of the Muon step")


def bench_ns(args: argparse.Namespace, device: torch.device) -> None:
    rows, cols = args.shape if args.shape else ((256, 1024) if args.quick else (768, 2048))
    m, n = min(rows, cols), max(rows, cols)
    G = torch.randn(rows, cols, device=device)
    a = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, m, device=device, dtype=torch.bfloat16)
    t_ns = timeit(lambda: zeropower_via_newtonschulz5(G), device, args.repeat * 4)
    t_mm = timeit(lambda: a @ b, device, args.repeat * 20)
    steps = 5
    flop_ratio = steps * (2 + m / n)
    mm_flops = 2 * m * m * n
    print(f"Newton-Schulz ({steps} steps, bf16) on [{rows}, {cols}] vs one bf16 matmul "
          f"[{m}, {n}] @ [{n}, {m}]:")
    print(f"  NS {t_ns * 1e3:.2f} ms, matmul {t_mm * 1e3:.3f} ms: time ratio {t_ns / t_mm:.1f}x,"
          f" FLOP ratio {flop_ratio:.1f}x, efficiency {flop_ratio / (t_ns / t_mm):.2f}")
    print(f"  matmul {mm_flops / t_mm / 1e9:.0f} GFLOP/s, "
          f"NS {flop_ratio * mm_flops / t_ns / 1e9:.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed optimizer steps, best of (default 5 with --quick, else 2)")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("ROWS", "COLS"),
                        help="Newton-Schulz matrix shape (default 768 2048, quick 256 1024)")
    parser.add_argument("--skip-steps", action="store_true", help="only the Newton-Schulz part")
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 5 if args.quick else 2
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f", {torch.get_num_threads()} threads"))
    bench_ns(args, device)
    if not args.skip_steps:
        bench_steps(args, device)


if __name__ == "__main__":
    main()
