"""`neotron train|prepare|eval|config CONFIG [key.path=value ...]`;
`neotron grow RUN_DIR --to CONFIG [key.path=value ...]`; `neotron convert SOURCE OUT`.

Under torchrun (`torchrun ... -m neotron train CONFIG`) every rank runs `main`; an uncaught
exception on any rank is printed on that rank's stderr and recorded for torchrun's failure
summary (torch.distributed.elastic's `record`)."""

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
    from neotron.arch import build_model
    from neotron.optim.routing import routing_table

    print(to_yaml(cfg), end="")
    # Which parameter goes to which optimizer, as YAML comments so the output stays loadable.
    # The model is built on the meta device: no memory, no initialization.
    model = build_model(cfg.model)
    table = routing_table(model, cfg.optim)
    print("# optimizer groups (neotron/optim/routing.py):")
    print("\n".join(f"#   {line}" for line in table.splitlines()))
    from neotron.arch.stack import param_summary

    note = param_summary(model)  # recursive / MoL models: unique parameters, effective depth
    if note:
        print(f"# {note}")
    return 0


def _cmd_prepare(cfg: RunConfig, args: argparse.Namespace) -> int:
    from neotron.data.prepare import prepare

    data = prepare(cfg.data, force=args.force, verify=args.verify)
    print(json.dumps({"dir": str(cfg.data.dir), "fingerprint": data.fingerprint,
                      "train_tokens": data.train.total_tokens, "val_tokens": data.val.total_tokens,
                      "vocab_size": data.vocab_size}))
    return 0


def _cmd_train(cfg: RunConfig, args: argparse.Namespace) -> int:
    from neotron.train.trainer import train

    result = train(cfg)
    summary = {"step": result.step, "tokens": result.tokens,
               "stopped_early": result.stopped_early, "val_loss": result.last_val_loss}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary, not one per rank
        print(json.dumps(summary))
    return 0


def _cmd_eval(cfg: RunConfig, args: argparse.Namespace) -> int:
    from neotron.train.evaluate import evaluate_latest

    result = evaluate_latest(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


CONVERT_HELP = ("export a checkpoint (a run directory's latest, or a checkpoint directory) as one"
                " consolidated safetensors file plus the run's config")


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="run directory, its checkpoints/ folder, or a step_XXXXXXXX dir")
    p.add_argument("out", help="output directory (model.safetensors, config.yaml, neotron.json)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast floating-point tensors (default: as saved, fp32)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    p.add_argument("--export-ternary", action="store_true",
                   help="BitNet runs: pack the ternary weights at 2 bits/weight plus scales"
                   " (OUT/model.ternary.safetensors) and report the size vs bf16")


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.export_ternary:
        from neotron.arch.quant.export import export_ternary

        if args.dtype is not None:
            raise UsageError("--dtype does not apply to --export-ternary (tensors stay as saved)")
        print(json.dumps(export_ternary(args.source, args.out, force=args.force)))
        return 0
    from neotron.convert import convert

    print(json.dumps(convert(args.source, args.out, dtype=args.dtype, force=args.force)))
    return 0


COMMANDS: dict[str, tuple[Callable[[RunConfig, argparse.Namespace], int], str]] = {
    "train": (_cmd_train, "train a model (resumes from run_dir's latest checkpoint)"),
    "prepare": (_cmd_prepare, "tokenize the data into packed shards (train does it if needed)"),
    "eval": (_cmd_eval, "validation loss of the run's latest checkpoint, as JSON"),
    "config": (_cmd_config, "print the fully resolved config and the optimizer groups"),
}


def _cmd_grow(cfg: RunConfig, args: argparse.Namespace) -> int:
    from neotron.grow import grow

    print(json.dumps(grow(args.run_dir, cfg, new_values=args.new_values,
                          reset_step=args.reset_step,
                          allow_function_change=args.allow_function_change, force=args.force)))
    return 0


GROW_HELP = ("grow a run's Pattention layers (more parameter tokens) into a new checkpoint in"
             " CONFIG's run_dir; `neotron train CONFIG` continues from it")


def _add_grow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the parent run directory (config.yaml, checkpoints/)")
    p.add_argument("--to", dest="config", required=True, metavar="CONFIG",
                   help="YAML config of the grown model")
    p.add_argument("overrides", nargs="*", help="key.path=value for CONFIG")
    p.add_argument("--new-values", choices=["random", "zero"], default="random",
                   help="new value tokens: the target's init (default) or zero; new keys are"
                   " always zero")
    p.add_argument("--reset-step", action="store_true",
                   help="start the grown run at step 0 (fresh schedule; data continues)")
    p.add_argument("--allow-function-change", action="store_true",
                   help="allow a Pattention norm_n different from the parent's")
    p.add_argument("--force", action="store_true", help="replace checkpoints in CONFIG's run_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neotron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key.path=value (value parsed as YAML)")
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="re-tokenize even if up to date")
            p.add_argument("--verify", action="store_true",
                           help="also hash every shard against index.json (reads all the data)")
    _add_grow_args(sub.add_parser("grow", help=GROW_HELP))
    _add_convert_args(sub.add_parser("convert", help=CONVERT_HELP))
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grow"]:
        # Intermixed: overrides may follow `--to CONFIG` (plain parse_args would refuse them).
        p = argparse.ArgumentParser(prog="neotron grow", description=GROW_HELP)
        _add_grow_args(p)
        args = p.parse_intermixed_args(argv[1:])
        args.command = "grow"
        return args
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # launched by torchrun
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Library modules log progress (data preparation, ...) through `logging`; show it on the
    # console. Under torchrun only rank 0 talks, errors excepted.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stdout)
    try:
        if args.command == "convert":
            return _cmd_convert(args)
        cfg = load(args.config, args.overrides)
        handler = _cmd_grow if args.command == "grow" else COMMANDS[args.command][0]
        return handler(cfg, args)
    except (ConfigError, UsageError) as e:
        # Every rank reports (a message per rank beats a silent hang); rank-tagged under torchrun.
        who = f"[rank {rank}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"neotron{who}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
