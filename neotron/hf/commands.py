"""The Hugging Face options of `neotron convert` (docs/hf.md)."""

from __future__ import annotations

import argparse
import json

from neotron.errors import UsageError
from neotron.hf.files import DEFAULT_MAX_SHARD


def add_hf_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["neotron", "hf"], default="neotron",
                   help="hf: a transformers directory (config.json, safetensors, tokenizer):"
                   " LlamaForCausalLM for pure Llama models, NeotronForCausalLM"
                   " (trust_remote_code=True) otherwise")
    p.add_argument("--from-hf", action="store_true",
                   help="import: SOURCE is a Hugging Face Llama directory, OUT becomes a neotron"
                   " run directory that train.init_from can start from")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD, metavar="SIZE",
                   help=f"--format hf: shard the weights above SIZE (default {DEFAULT_MAX_SHARD};"
                   " e.g. 500MB, 2GiB)")


def cmd_convert_hf(args: argparse.Namespace) -> int:
    others = [flag for flag, on in (("--export-ternary", args.export_ternary),
                                    ("--merge-mol", getattr(args, "merge_mol", False))) if on]
    if others:
        raise UsageError(f"{others[0]} does not combine with --format hf / --from-hf")
    if args.from_hf:
        if args.format == "hf":
            raise UsageError("--from-hf writes a neotron run; export it with a second"
                             " `neotron convert OUT OUT2 --format hf`")
        from neotron.hf.import_llama import import_hf

        info = import_hf(args.source, args.out, dtype=args.dtype, force=args.force)
    else:
        from neotron.hf.export import export_hf

        info = export_hf(args.source, args.out, dtype=args.dtype, force=args.force,
                         max_shard_size=args.max_shard_size)
    print(json.dumps(info))
    return 0
