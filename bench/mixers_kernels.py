"""Forward+backward time of the chunked delta-rule kernels against the token-by-token
references, on CPU, measured in the same run (so the ratio is meaningful on a shared machine).

    OMP_NUM_THREADS=1 python bench/mixers_kernels.py [--T 512 2048] [--repeats 3]

Shapes: batch 1, 4 heads, d_k = d_v = 64, fp32, L2-normalized k, sigmoid beta, chunk 64.
Prints the median seconds of each path and the speedup (reference time / chunked time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from neotron.kernels.delta_rule import delta_rule
from neotron.kernels.gated_delta_rule import gated_delta_rule


def _inputs(t: int, gated: bool, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, h, d = 1, 4, 64
    q = F.normalize(torch.randn(b, t, h, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, t, h, d, generator=gen), dim=-1)
    v = torch.randn(b, t, h, d, generator=gen)
    beta = torch.randn(b, t, h, generator=gen).sigmoid()
    xs = [q, k, v, beta]
    if gated:
        xs.insert(3, F.logsigmoid(torch.randn(b, t, h, generator=gen) + 3.0))
    return [x.requires_grad_() for x in xs]


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (allocator, first-call dispatch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(op: Callable[..., tuple], xs: list[torch.Tensor], impl: str) -> Callable[[], None]:
    def run() -> None:
        for x in xs:
            x.grad = None
        o, s = op(*xs, impl=impl, output_final_state=True)
        (o.square().sum() + s.square().sum()).backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, B=1 H=4 d=64")
    print(f"{'kernel':<18}{'T':>6}{'reference s':>14}{'chunked s':>12}{'speedup':>10}")
    for name, op, gated in (
        ("delta_rule", delta_rule, False),
        ("gated_delta_rule", gated_delta_rule, True),
    ):
        for t in args.T:
            xs = _inputs(t, gated)
            ref = _time(_fwd_bwd(op, xs, "reference"), args.repeats)
            chk = _time(_fwd_bwd(op, xs, "chunked"), args.repeats)
            print(f"{name:<18}{t:>6}{ref:>14.4f}{chk:>12.4f}{ref / chk:>9.1f}x")


if __name__ == "__main__":
    main()
