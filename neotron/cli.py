"""`neotron train|prepare|eval|config CONFIG [key.path=value ...]`;
`neotron grow RUN_DIR --to CONFIG [key.path=value ...]`; `neotron convert SOURCE OUT`;
`neotron study STUDY.yaml [key.path=value ...]`; `neotron plot RUN_DIR ... [--x steps|tokens|flops]`.

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
    from neotron.arch.accounting import flops_per_token, param_counts

    c = param_counts(model)  # docs/accounting.md: what each count includes
    print(f"# parameters: {c.total:,} total, {c.active:,} active per token, {c.embedding:,}"
          f" embedding, {c.non_embedding:,} non-embedding")
    print(f"# training FLOPs per token (forward + backward) at seq_len {cfg.data.seq_len}:"
          f" {flops_per_token(model, cfg.data.seq_len):.4g}")
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
    p.add_argument("--merge-mol", action="store_true",
                   help="Mixture-of-LoRAs runs: merge the experts into plain SwiGLU weights"
                   " (calibrated mean gates) and write OUT as a run directory; prints the"
                   " validation loss before and after (docs/recursion.md)")
    p.add_argument("--calib-batches", type=int, default=4, metavar="N",
                   help="--merge-mol: validation batches (eval.batch_size windows) to calibrate"
                   " the gates on (default 4)")
    from neotron.hf.commands import add_hf_convert_args

    add_hf_convert_args(p)  # --format hf, --from-hf, --max-shard-size (docs/hf.md)


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.format == "hf" or args.from_hf:
        from neotron.hf.commands import cmd_convert_hf

        return cmd_convert_hf(args)
    if args.merge_mol:
        from neotron.train.evaluate import merge_mol

        if args.dtype is not None or args.export_ternary:
            raise UsageError("--merge-mol writes a run directory in the run's dtype; convert"
                             " its output again for --dtype or --export-ternary")
        info = merge_mol(args.source, args.out, calib_batches=args.calib_batches,
                         force=args.force)
        print(f"val loss before merging (MoL experts): {info['val_loss_before']:.4f}")
        print(f"val loss after merging (one SwiGLU):   {info['val_loss_after']:.4f}")
        print(json.dumps(info))
        return 0
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


# Every subcommand's --help shows what it does, a command to copy, and where the config keys
# are. A new subcommand needs an entry here (tests/test_cli.py checks them all).
EXAMPLES = {
    "train": "neotron train configs/demo/llama.yaml run_dir=runs/demo train.steps=200",
    "prepare": "neotron prepare configs/demo/llama.yaml --verify",
    "eval": "neotron eval configs/demo/llama.yaml run_dir=runs/demo",
    "config": "neotron config configs/demo/hybrid.yaml model.n_layers=4",
    "grow": "neotron grow runs/tokenformer --to configs/demo/tokenformer.yaml"
            " run_dir=runs/grown model.linear.n_tokens=384",
    "convert": "neotron convert runs/demo exports/demo --format hf",
    "generate": 'neotron generate runs/demo --prompt "To be, or not to be" --max-new-tokens 32',
    "study": "neotron study configs/studies/demo.yaml",
    "plot": "neotron plot runs/a runs/b --x tokens --out curves.png",
}
KEYS_POINTER = ("config keys: `neotron config CONFIG` prints every key with its resolved value;\n"
                "override any as key.path=value. docs/ has a page per area.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neotron")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from neotron import __version__

        return __version__


def _document(p: argparse.ArgumentParser, name: str, help_text: str | None) -> None:
    """Description, example and the pointer to `neotron config` for subcommand `name`."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = p.description or help_text
    example = EXAMPLES.get(name)
    p.epilog = (f"example:\n  {example}\n\n" if example else "") + KEYS_POINTER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neotron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"`neotron COMMAND --help` for each command.\n{KEYS_POINTER}")
    parser.add_argument("--version", action="version", version=f"neotron {_version()}")
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
    from neotron.generate import GENERATE_HELP, add_generate_args

    add_generate_args(sub.add_parser("generate", help=GENERATE_HELP))
    from neotron.study.commands import PLOT_HELP, STUDY_HELP, add_plot_args, add_study_args

    add_study_args(sub.add_parser("study", help=STUDY_HELP))
    add_plot_args(sub.add_parser("plot", help=PLOT_HELP))
    for action in sub._choices_actions:  # argparse keeps each subcommand's help only here
        _document(sub.choices[action.dest], action.dest, action.help)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace | None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare `neotron` asks what there is: help on stdout, exit 0
        build_parser().print_help()
        return None
    if argv[:1] == ["grow"]:
        # Intermixed: overrides may follow `--to CONFIG` (plain parse_args would refuse them).
        p = argparse.ArgumentParser(prog="neotron grow")
        _document(p, "grow", GROW_HELP)
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
    if args is None:
        return 0
    # Library modules log progress (data preparation, ...) through `logging`; show it on the
    # console. Under torchrun only rank 0 talks, errors excepted.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stdout)
    try:
        if args.command == "convert":
            return _cmd_convert(args)
        if args.command == "generate":
            from neotron.generate import cmd_generate

            return cmd_generate(args)
        if args.command in ("study", "plot"):
            from neotron.study.commands import cmd_plot, cmd_study

            return (cmd_study if args.command == "study" else cmd_plot)(args)
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
