"""`neotron train|prepare|eval|config CONFIG [key.path=value ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from neotron.config import RunConfig, load, to_yaml
from neotron.errors import ConfigError, UsageError


def _cmd_config(cfg: RunConfig, args: argparse.Namespace) -> int:
    print(to_yaml(cfg), end="")
    return 0


def _cmd_prepare(cfg: RunConfig, args: argparse.Namespace) -> int:
    from neotron.data.prepare import prepare

    data = prepare(cfg.data, force=args.force)
    print(json.dumps({"dir": str(cfg.data.dir), "fingerprint": data.fingerprint,
                      "train_tokens": data.train.total_tokens, "val_tokens": data.val.total_tokens,
                      "vocab_size": data.vocab_size}))
    return 0


def _cmd_train(cfg: RunConfig, args: argparse.Namespace) -> int:
    from neotron.train.trainer import train

    result = train(cfg)
    summary = {"step": result.step, "tokens": result.tokens,
               "stopped_early": result.stopped_early, "val_loss": result.last_val_loss}
    print(json.dumps(summary))
    return 0


def _cmd_eval(cfg: RunConfig, args: argparse.Namespace) -> int:
    from neotron.train.evaluate import evaluate_latest

    print(json.dumps(evaluate_latest(cfg)))
    return 0


COMMANDS: dict[str, tuple[Callable[[RunConfig, argparse.Namespace], int], str]] = {
    "train": (_cmd_train, "train a model (resumes from run_dir's latest checkpoint)"),
    "prepare": (_cmd_prepare, "tokenize the data into packed shards (train does it if needed)"),
    "eval": (_cmd_eval, "validation loss of the run's latest checkpoint, as JSON"),
    "config": (_cmd_config, "print the fully resolved config"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neotron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key.path=value (value parsed as YAML)")
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="re-tokenize even if up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library modules log progress (data preparation, ...) through `logging`; show it on the
    # console. Under torchrun only rank 0 talks, errors excepted.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stdout)
    try:
        cfg = load(args.config, args.overrides)
        return COMMANDS[args.command][0](cfg, args)
    except (ConfigError, UsageError) as e:
        print(f"neotron: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
