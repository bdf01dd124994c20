"""`neotron eval`: the validation loss of a run's latest checkpoint (and, with `eval.per_loop`,
of each loop's early exit: loss_loop<k>). `neotron convert RUN OUT --merge-mol`: the same
evaluation before and after merging a Mixture-of-LoRAs run's experts (arch/mol_merge.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from neotron.arch import build_model, materialize
from neotron.config import RunConfig, load, to_yaml, validate
from neotron.data.loader import ValLoader
from neotron.data.prepare import prepare
from neotron.errors import UsageError
from neotron.train.checkpoint import Checkpointer
from neotron.train.parallel import parallelize, setup_env, teardown
from neotron.train.trainer import evaluate, forward


def _load_latest(cfg: RunConfig, env, what: str = "evaluate"):
    """(model with the run's latest weights, its meta.json, its path)."""
    ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint.keep_last,
                        is_writer=False)
    latest = ckpt.latest()
    if latest is None:
        raise UsageError(f"no checkpoint to {what} in {ckpt.dir}")
    model = parallelize(materialize(build_model(cfg.model), env.device, cfg.train.seed), env)
    meta = ckpt.load(latest, model, None, restore_rng=False)
    return model, meta, latest


def evaluate_latest(cfg: RunConfig) -> dict:
    env = setup_env(cfg, async_checkpoint=False)
    model, meta, _ = _load_latest(cfg, env)
    data = prepare(cfg.data)
    val = evaluate(model, data, cfg, env)
    teardown(env)
    per_loop = {k.removeprefix("val_"): v for k, v in val.items() if k.startswith("val_loss_loop")}
    return {"step": meta["step"], "loss": val["val_loss"], "ppl": val["val_ppl"], **per_loop}


def merge_mol(source: str | Path, out: str | Path, calib_batches: int = 4,
              force: bool = False) -> dict[str, Any]:
    """Merge the MoL experts of run `source` (its latest checkpoint) into plain SwiGLU weights,
    calibrated on `calib_batches` validation batches (the ones after those `neotron eval`
    scores, when the split is long enough); write OUT as a run directory (config.yaml,
    checkpoints/, neotron.json) that `neotron eval OUT/config.yaml` and `train.init_from: OUT`
    read. Returns the summary, with the validation loss before and after."""
    from neotron.arch.mol_merge import (
        calibrate,
        check_mergeable,
        merged_model_config,
        merged_state,
    )
    from neotron.optim.builder import build_optimizer

    src, out = Path(source), Path(out)
    if calib_batches < 1:
        raise UsageError(f"--calib-batches must be at least 1, got {calib_batches}")
    if not (src / "config.yaml").is_file():
        raise UsageError(f"--merge-mol: {src} is not a run directory (no config.yaml)")
    if out.resolve() == src.resolve():
        raise UsageError("--merge-mol: OUT must be a new directory, not the run itself")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty (--force overwrites)")
    cfg = load(src / "config.yaml")
    check_mergeable(build_model(cfg.model), str(src))  # meta device: before any data or weights
    env = setup_env(cfg, async_checkpoint=False)
    if env.distributed:
        raise UsageError("--merge-mol runs in one process (not under torchrun)")
    model, meta, latest = _load_latest(cfg, env, "merge")
    data = prepare(cfg.data)
    before = evaluate(model, data, cfg, env)
    # Calibration: validation windows after the evaluated ones, so the merge is not fitted on
    # the tokens it is scored on (the first ones again if the split is too short).
    n_eval = len(ValLoader(data.val, cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.batches))
    loader = ValLoader(data.val, cfg.data.seq_len, cfg.eval.batch_size, n_eval + calib_batches)
    disjoint = len(loader) > n_eval
    picked = [b for i, b in enumerate(loader) if i >= n_eval or not disjoint][:calib_batches]
    model.eval()
    per_loop = calibrate(model, picked, lambda b: forward(model, b[:, :-1].to(env.device), cfg,
                                                          data.eos_id, env))
    g_bars = {name: g.mean(0) for name, g in per_loop.items()}  # pooled over the loops
    merged_cfg = validate({**cfg.model_dump(mode="json"), "run_dir": str(out),
                           "model": merged_model_config(cfg.model).model_dump(mode="json")})
    merged = materialize(build_model(merged_cfg.model), env.device, cfg.train.seed)
    merged.load_state_dict(merged_state(model, g_bars))  # strict: names and shapes agree
    after = evaluate(merged, data, merged_cfg, env)
    info: dict[str, Any] = {
        "source": str(latest.resolve()), "step": meta["step"],
        "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
        "calib_batches": len(picked), "calib_disjoint_from_eval": disjoint,
        "eval_batches": n_eval,
        "params": [sum(p.numel() for p in model.parameters()),
                   sum(p.numel() for p in merged.parameters())],
        "mean_gates": {name: [round(v, 6) for v in g.tolist()] for name, g in g_bars.items()},
        "mean_gates_per_loop": {name: [[round(v, 6) for v in row] for row in g.tolist()]
                                for name, g in per_loop.items()},
    }
    info.update({f"{k}_before": v for k, v in before.items() if k.startswith("val_loss_loop")})
    info.update({f"{k}_after": v for k, v in after.items() if k.startswith("val_loss_loop")})
    for stale in ("checkpoints", "metrics.jsonl", "tb"):  # --force: what a run dir holds
        p = out / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(merged_cfg))
    new_meta = {k: v for k, v in meta.items() if k not in ("step", "format", "world_size")}
    new_meta["model_params"] = info["params"][1]
    new_meta["merged_mol"] = {k: info[k] for k in ("source", "val_loss_before",
                                                   "val_loss_after", "calib_batches")}
    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint.keep_last)
    info["checkpoint"] = str(ckpt.save(int(meta["step"]), merged,
                                       build_optimizer(merged, merged_cfg.optim), new_meta))
    info["config"] = str(out / "config.yaml")
    (out / "neotron.json").write_text(json.dumps(info, indent=2) + "\n")
    teardown(env)
    return info
