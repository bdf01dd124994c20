"""neotron's default recipes against the official ones, on the CPU demo configs.

    OMP_NUM_THREADS=1 python bench/recipes.py [--blocks memory tokenformer gated_deltanet]
        [--steps 150] [--seeds 0] [--out runs/recipes] [overrides ...]

For each block, each recipe (`init: neotron` vs `init: reference`, plus the reference's
biases and weight decay where they differ; `VARIANTS` below) trains the block's demo config
(`configs/demo/<block>.yaml`) for --steps steps in a fresh `neotron train` process, one run
at a time, with the same data order and seed; the table gives each run's final validation
loss (32 batches of 16 x 128 tokens) and its difference from the neotron recipe of the same
block and seed. Runs that already finished are read back, not repeated, so an interrupted
bench resumes. A difference is only meaningful against the spread between seeds (--seeds 0 1).
docs/mixers.md and docs/memory_layers.md quote the numbers this printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lr_sweep import train_once  # bench/ is sys.path[0] when this runs as a script

# block -> (demo config, {recipe: overrides}); the first recipe is the baseline.
VARIANTS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "memory": ("configs/demo/memory.yaml", {
        "neotron": [],
        "reference": ["model.blocks.memory.ffn.init=reference", "model.blocks.memory.ffn.bias=true",
                      "model.blocks.memory.ffn.value_weight_decay=0.1"],
        "reference_init": ["model.blocks.memory.ffn.init=reference"],
    }),
    "tokenformer": ("configs/demo/tokenformer.yaml", {
        "neotron": [],
        "reference": ["model.linear.init=reference",
                      "model.blocks.tokenformer.ffn.init=reference"],
    }),
    "gated_deltanet": ("configs/demo/gated_deltanet.yaml", {
        "neotron": [],
        "reference": ["model.blocks.gated_deltanet.mixer.init=reference"],
        "uniform_conv": ["model.blocks.gated_deltanet.mixer.conv_init=uniform"],
    }),
    "deltanet": ("configs/demo/deltanet.yaml", {
        "neotron": [],
        "reference": ["model.blocks.deltanet.mixer.init=reference"],
        "uniform_conv": ["model.blocks.deltanet.mixer.conv_init=uniform"],
    }),
    "memoryformer": ("configs/demo/memoryformer.yaml", {
        "neotron": [],
        "reference": ["model.blocks.memoryformer.mixer.init=reference",
                      "model.blocks.memoryformer.ffn.init=reference"],
    }),
}


def run(config: str, overrides: list[str], run_dir: Path) -> float | None:
    return train_once(config, [*overrides, "eval.every=0", "eval.at_start=false",
                               "eval.batches=32"], run_dir, f"  {run_dir.name}:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key.path=value applied to every run")
    parser.add_argument("--blocks", nargs="+", default=["memory", "tokenformer", "gated_deltanet"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--recipes", nargs="+", default=["neotron", "reference"],
                        help="recipe names of VARIANTS to run (those a block has)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/recipes")
    args = parser.parse_args()

    rows = []
    for block in args.blocks:
        config, recipes = VARIANTS[block]
        for seed in args.seeds:
            base = None
            for name, extra in recipes.items():
                if name not in args.recipes:
                    continue
                run_dir = Path(args.out) / f"{block}-{name}-s{seed}-{args.steps}"
                loss = run(config, [*args.overrides, f"train.steps={args.steps}",
                                    f"train.seed={seed}", *extra], run_dir)
                base = loss if base is None else base
                rows.append((block, name, seed, loss, base))

    print(f"\nsteps {args.steps}; final val_loss; delta = recipe - neotron (same block, seed)")
    print(f"{'block':15s} {'recipe':15s} {'seed':>4s} {'val_loss':>9s} {'delta':>8s}")
    for block, name, seed, loss, base in rows:
        shown = f"{loss:.4f}" if loss is not None else "failed"
        delta = f"{loss - base:+.4f}" if loss is not None and base is not None else ""
        print(f"{block:15s} {name:15s} {seed:>4d} {shown:>9s} {delta:>8s}")


if __name__ == "__main__":
    main()
