"""`neotron eval`: the validation loss of a run's latest checkpoint."""

from __future__ import annotations

from pathlib import Path

from neotron.arch import build_model, materialize
from neotron.config import RunConfig
from neotron.data.prepare import prepare
from neotron.errors import UsageError
from neotron.train.checkpoint import Checkpointer
from neotron.train.parallel import parallelize, setup_env, teardown
from neotron.train.trainer import evaluate


def evaluate_latest(cfg: RunConfig) -> dict:
    env = setup_env(cfg, async_checkpoint=False)
    ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint.keep_last,
                        is_writer=False)
    latest = ckpt.latest()
    if latest is None:
        raise UsageError(f"no checkpoint to evaluate in {ckpt.dir}")
    data = prepare(cfg.data)
    model = parallelize(materialize(build_model(cfg.model), env.device, cfg.train.seed), env)
    meta = ckpt.load(latest, model, None, restore_rng=False)
    val = evaluate(model, data, cfg, env)
    teardown(env)
    return {"step": meta["step"], "loss": val["val_loss"], "ppl": val["val_ppl"]}
