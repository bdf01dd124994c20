"""`neotron grow RUN_DIR --to CONFIG`: TokenFormer's incremental scaling from a checkpoint.

Wang et al., "TokenFormer", arXiv 2410.23168, section 3.5: a trained model is scaled up by
appending key/value parameter tokens to its Pattention layers (arch/tokenformer.py) and
training on. This command does the checkpoint surgery:

1. reads the parent run's resolved config (RUN_DIR/config.yaml) and its latest checkpoint
   (model, optimizer, RNG, data position);
2. builds the target model of CONFIG, whose Pattention layers may have more tokens
   (`n_tokens`) and must otherwise have the parent's shapes;
3. copies every parameter; a grown Pattention layer gets the old tokens in its first n rows,
   new **keys zero**, and new values random (the target model's own init, default) or zero
   (`--new-values zero`). Zero keys give scores 0, GeLU(0) = 0 and an unchanged ||A_i||, so
   the new tokens add exactly nothing, whatever their values, provided the normalization's n
   stays the parent's: the target config must set `norm_n` to the parent's n (checked; see
   `--allow-function-change`);
4. extends the optimizer state the same way (the new rows' moments are zero; step counters
   and all other state are kept), so AdamW/Muon continue where they were;
5. writes it as the target run_dir's first checkpoint, in the trainer's layout, with the
   parent's meta.json fields (tokens, data position, ...; model_params of the grown model;
   plus `grown_from`), so that
   `neotron train CONFIG` resumes from it like from any checkpoint of its own.

Why the new values default to random and not zero: with zero keys *and* zero values, a new
token's key gradient is proportional to its value (GeLU'(0) * sqrt(n)/||A_i|| * <g_i, v_j>)
and its value gradient to its score (GeLU(0) = 0): both are exactly zero, and the new
tokens never train. Zero keys alone already preserve the function.

With `--reset-step` the new checkpoint is at step 0 (a fresh learning-rate schedule for the
grown model, as the paper trains each grown model with its own schedule) while the data
position still continues where the parent stopped (no data is repeated) and the optimizer
keeps its moments and step counters.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from neotron.arch import build_model, materialize
from neotron.arch.tokenformer import Pattention
from neotron.config import RunConfig, load, to_yaml
from neotron.errors import UsageError
from neotron.optim.builder import build_optimizer
from neotron.train.checkpoint import Checkpointer

NewValues = Literal["random", "zero"]


def _grow_tensor(t: torch.Tensor, old: torch.Size, new: torch.Size) -> torch.Tensor:
    """Zero-pad `t` (a parameter's value or optimizer state) from a parameter of shape `old`
    to one of shape `new`, along the dims where `t` spans the parameter and the parameter
    grew. Other tensors (step counters, reduced statistics) are copied as they are."""
    if t.ndim != len(old) or t.ndim == 0 or old == new:
        return t.detach().clone()
    shape = [n if s == o and n != o else s for s, o, n in zip(t.shape, old, new)]
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t.detach()
    return out


def _check_same_run(parent: RunConfig, target: RunConfig) -> None:
    if parent.data != target.data:
        raise UsageError("the target config's data section differs from the parent's: the grown"
                         " run continues the parent's data order, so it needs the same data")
    if parent.train.seed != target.train.seed:
        raise UsageError(f"train.seed: the parent used {parent.train.seed}, the target has"
                         f" {target.train.seed}; the data order depends on it")


def _pattention_pairs(parent: nn.Module, target: nn.Module) -> list[tuple[str, Pattention, Pattention]]:
    out = []
    for name, mod in target.named_modules():
        if isinstance(mod, Pattention):
            old = parent.get_submodule(name)
            if not isinstance(old, Pattention):
                raise UsageError(f"{name}: a Pattention layer in the target but not in the parent")
            out.append((name, old, mod))
    return out


def grow(
    run_dir: str | Path,
    target: RunConfig,
    *,
    new_values: NewValues = "random",
    reset_step: bool = False,
    allow_function_change: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Write the grown checkpoint into `target.run_dir`; returns a JSON-able summary."""
    src = Path(run_dir)
    if not (src / "config.yaml").is_file():
        raise UsageError(f"{src} is not a run directory (no config.yaml)")
    parent_cfg = load(src / "config.yaml")
    dst = Path(target.run_dir)
    if dst.resolve() == src.resolve():
        raise UsageError("the grown model needs its own run_dir: set run_dir in the target config")
    parent_ckpt = Checkpointer(src / "checkpoints", parent_cfg.checkpoint.keep_last, is_writer=False)
    latest = parent_ckpt.latest()
    if latest is None:
        raise UsageError(f"no checkpoint to grow from in {parent_ckpt.dir}")
    out_ckpt = Checkpointer(dst / "checkpoints", target.checkpoint.keep_last)
    occupied = out_ckpt.latest() is not None
    if occupied and not force:
        raise UsageError(f"{out_ckpt.dir} already holds checkpoints (--force replaces them)")
    _check_same_run(parent_cfg, target)

    # The target first: the parent's load then restores the checkpoint's RNG state, which the
    # grown checkpoint carries on.
    model = materialize(build_model(target.model), "cpu", target.train.seed)
    parent = materialize(build_model(parent_cfg.model), "cpu", parent_cfg.train.seed)
    parent_opt = build_optimizer(parent, parent_cfg.optim)
    meta = parent_ckpt.load(latest, parent, parent_opt, restore_rng=True)

    old_params = dict(parent.named_parameters())
    new_params = dict(model.named_parameters())
    if old_params.keys() != new_params.keys():
        only_old = sorted(old_params.keys() - new_params.keys())[:3]
        only_new = sorted(new_params.keys() - old_params.keys())[:3]
        raise UsageError("grow only adds Pattention tokens; the models' parameters differ"
                         f" (only in the parent: {only_old}, only in the target: {only_new})")

    growable: dict[str, Pattention] = {}
    for name, old, new in _pattention_pairs(parent, model):
        if old.cfg.norm != new.cfg.norm:
            raise UsageError(f"{name}: Pattention norm {old.cfg.norm} -> {new.cfg.norm}")
        if new.n_tokens < old.n_tokens:
            raise UsageError(f"{name}: {old.n_tokens} -> {new.n_tokens} tokens; grow cannot shrink")
        if new.norm_n != old.norm_n and not allow_function_change:
            raise UsageError(
                f"{name}: the normalization's n would change from {old.norm_n} to {new.norm_n},"
                f" which rescales every output; set norm_n: {old.norm_n} in the target's"
                " Pattention configs (model.linear, pattention FFNs) to keep the parent's"
                " function, or pass --allow-function-change"
            )
        growable[f"{name}.keys" if name else "keys"] = new
        growable[f"{name}.values" if name else "values"] = new

    grown: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, p_new in new_params.items():
            p_old = old_params[name]
            if p_old.shape == p_new.shape:
                p_new.copy_(p_old)
                continue
            layer = growable.get(name)
            same_rest = p_old.shape[1:] == p_new.shape[1:]
            if layer is None or not same_rest:
                raise UsageError(f"{name}: shape {tuple(p_old.shape)} -> {tuple(p_new.shape)};"
                                 " grow only adds Pattention tokens (rows of keys and values)")
            n_old = p_old.shape[0]
            p_new[:n_old] = p_old
            if name.endswith("keys") or new_values == "zero":
                p_new[n_old:] = 0
            if name.endswith("keys"):
                grown.append({"layer": name.removesuffix(".keys"), "tokens": [n_old, p_new.shape[0]]})

    optimizer = build_optimizer(model, target.optim)
    for name, p_new in new_params.items():
        state = parent_opt.state.get(old_params[name])
        if state:
            optimizer.state[p_new] = {
                k: _grow_tensor(v, old_params[name].shape, p_new.shape) if torch.is_tensor(v) else v
                for k, v in state.items()
            }

    step = 0 if reset_step else int(meta["step"])
    if not reset_step and target.train.steps <= step:
        raise UsageError(f"train.steps={target.train.steps} leaves nothing to train after the"
                         f" parent's step {step} (raise it, or pass --reset-step)")
    # The parent's meta.json fields (whatever the trainer records: data position, tokens,
    # fault counters, ...), except what describes this checkpoint's writing: the step, the
    # format and world size (Checkpointer.save sets them; one process writes this one, so a
    # resume on N processes reshards and does not look for N RNG states), the layout.
    new_meta = {k: v for k, v in meta.items() if k not in ("step", "format", "world_size")}
    if isinstance(meta.get("parallel"), list):
        new_meta["parallel"] = [1] * len(meta["parallel"])
    new_meta["model_params"] = sum(p.numel() for p in model.parameters())
    if reset_step:
        new_meta["tokens"] = 0
    new_meta["grown_from"] = {"checkpoint": str(latest.resolve()), "step": meta["step"],
                              "model_params": sum(p.numel() for p in parent.parameters()),
                              "new_values": new_values}
    if occupied:  # --force, and every check passed: replace the old run's state
        shutil.rmtree(out_ckpt.dir)
        for stale in ("metrics.jsonl", "tb"):
            p = dst / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(to_yaml(target))
    path = out_ckpt.save(step, model, optimizer, new_meta)
    return {"from": str(latest), "to": str(path), "step": step,
            "params": [new_meta["grown_from"]["model_params"], new_meta["model_params"]],
            "grown": grown}
