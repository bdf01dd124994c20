"""`train.init_from: RUN_DIR_OR_CHECKPOINT`: start a run from another run's model weights.

Weights only: the optimizer state, the learning-rate schedule, the step, the token count and
the data position all start fresh, as in a new run. This is how a full-precision model is
fine-tuned into a ternary one (configs/demo/bitnet_finetune.yaml), and how any run can start
from a parent's weights with another recipe.

Rules:
- Resume wins. When `run_dir` already holds a checkpoint to resume (and checkpoint.resume is
  `auto`), `init_from` is ignored and the run continues from that checkpoint: the same command
  restarts a preempted fine-tune where it stopped, instead of starting it over.
- Names and shapes must match the model exactly, except the parameters a module declares new
  in its `_neotron_init_from_optional` (e.g. BitLinear's extra RMSNorm, which a dense parent
  does not have): those keep their fresh initialization when the source lacks them. Anything
  else (a tensor missing, one too many, a shape that differs) is a ConfigError naming
  `train.init_from`, before any training.
- A dense parent into a recursive model (`model.recursion`, n_layers x loops = the parent's
  layers) is mapped first by neotron/arch/recursion_init.py: shared blocks = the average of
  the tied layers, per-loop LoRA = truncated SVD of each layer's residual.
- The tensors are read only through `neotron.convert.load_model_tensors` (the allow-listed
  DCP reader: nothing is unpickled but DCP metadata), in full on every rank, and loaded into
  the possibly sharded (FSDP2 / tensor-parallel) model with `set_model_state_dict(...,
  full_state_dict=True)`, which keeps each rank's shard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from neotron.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

OPTIONAL_ATTR = "_neotron_init_from_optional"  # on a module: local parameter names


def resume_pending(cfg) -> Path | None:
    """The checkpoint this run would resume from, or None."""
    from neotron.train.checkpoint import Checkpointer

    if cfg.checkpoint.resume == "never":
        return None
    return Checkpointer(Path(cfg.run_dir) / "checkpoints", keep_last=1, is_writer=False).latest()


def optional_names(model: nn.Module) -> set[str]:
    names = set()
    for mname, module in model.named_modules():
        for local in getattr(module, OPTIONAL_ATTR, ()):
            names.add(f"{mname}.{local}" if mname else local)
    return names


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def match_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                  source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's tensors checked against the model's state dict (names, global shapes)
    and cast to the model's dtypes; and the names that keep their fresh init. Raises one
    ConfigError naming every kind of mismatch."""
    want = model.state_dict()  # DTensor shards report their global shape
    optional = optional_names(model)
    missing = sorted(k for k in want if k not in tensors and k not in optional)
    unexpected = sorted(k for k in tensors if k not in want)
    shapes = [f"{k} is {list(tensors[k].shape)} there, {list(want[k].shape)} here"
              for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensor(s) missing from it: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) this model does not have: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_few(shapes)}")
    if problems:
        raise ConfigError(f"train.init_from: {source} does not fit this model: "
                          + "; ".join(problems))
    state = {k: tensors[k].to(want[k].dtype) for k in want if k in tensors}
    kept = sorted(k for k in want if k not in tensors)
    return state, kept


def init_from(model: nn.Module, cfg, *, is_main: bool = True) -> bool:
    """Load `cfg.train.init_from`'s model weights into `model` (built, possibly parallelized,
    before the optimizer exists). Returns False when a checkpoint to resume wins."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from neotron.convert import find_checkpoint, load_model_tensors

    source = cfg.train.init_from
    pending = resume_pending(cfg)
    if pending is not None:
        if is_main:
            log.info(f"train.init_from ignored: resuming from {pending} (resume wins)")
        return False
    try:
        ckpt, _ = find_checkpoint(source)
    except UsageError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    tensors = load_model_tensors(ckpt)
    from neotron.arch.recursion_init import needs_mapping, to_recursive

    if needs_mapping(tensors, cfg.model):  # a dense parent into a looped model (averaged + SVD)
        tensors = to_recursive(tensors, cfg.model)
    state, kept = match_tensors(model, tensors, str(ckpt))
    n_loaded = len(state)  # set_model_state_dict may add the missing keys to `state`
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                strict=not kept))
    if is_main:
        note = f"; fresh init kept for {len(kept)} new tensor(s): {_few(kept)}" if kept else ""
        log.info(f"initialized the model's weights from {ckpt} ({n_loaded} tensors){note}")
    return True
