"""The training loop: data -> model -> optimizer -> metrics, evaluation and checkpoints.

The loop is written so that a run resumed from a checkpoint takes exactly the same steps as an
uninterrupted one: the data position, optimizer state, RNG state and step are restored, and the
learning rate is a pure function of the step (optim/schedules.py).
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neotron.arch import build_model, materialize
from neotron.arch.context import SeqInfo
from neotron.config import RunConfig, to_yaml
from neotron.data.loader import TokenLoader, ValLoader
from neotron.data.prepare import PreparedData, prepare
from neotron.optim.builder import build_optimizer, routing_table
from neotron.optim.schedules import lr_multiplier
from neotron.train.checkpoint import Checkpointer
from neotron.train.faults import StopFlag
from neotron.train.metrics import MetricsLogger, peak_flops
from neotron.train.parallel import DistEnv, parallelize, setup_env


@dataclass
class TrainResult:
    step: int
    tokens: int
    stopped_early: bool
    last_val_loss: float | None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def forward(model: torch.nn.Module, inputs: torch.Tensor, cfg: RunConfig, eos_id: int):
    """Logits for a batch; with data.document_masking, documents packed into one row are
    kept apart (attention masked across them, recurrent state reset, positions restarted)."""
    eos = eos_id if cfg.data.document_masking else None
    with autocast_for(cfg, inputs.device):
        return model(inputs, SeqInfo.for_tokens(inputs, eos))


def autocast_for(cfg: RunConfig, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: PreparedData, cfg: RunConfig, env: DistEnv) -> dict:
    """Loss and perplexity on the same held-out windows every time."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = ValLoader(data.val, cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.batches,
                        dp_rank=env.rank, dp_world=env.world_size)
    for batch in batches:
        batch = batch.to(env.device)
        logits = forward(model, batch[:, :-1], cfg, data.eos_id)
        total += lm_loss(logits, batch[:, 1:]).item() * batch.shape[0]
        count += batch.shape[0]
    model.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _memory_record(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is KiB on Linux
    return {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.env = setup_env(cfg.train.device)
        self.run_dir = Path(cfg.run_dir)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.data = prepare(cfg.data)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.data.vocab_size} tokens but model.vocab_size is"
                f" {cfg.model.vocab_size}"
            )
        model = materialize(build_model(cfg.model), self.env.device, cfg.train.seed)
        self.model = parallelize(model, self.env)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self._group_settings = [(g["base_lr"], g["weight_decay"]) for g in self.optimizer.param_groups]
        self.loader = TokenLoader(self.data.train, cfg.data.seq_len, cfg.train.seed,
                                  dp_rank=self.env.rank, dp_world=self.env.world_size)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                 is_writer=self.env.is_main)
        self.step = 0
        self.tokens = 0
        self.resumed_from: Path | None = None
        # Seed after building so the first step's RNG does not depend on how many random
        # numbers initialization drew (a resumed run restores this state from the checkpoint).
        torch.manual_seed(cfg.train.seed + 1)
        self._maybe_resume()
        self.metrics = MetricsLogger(
            self.run_dir, is_writer=self.env.is_main, tensorboard=cfg.log.tensorboard,
            resume_step=self.step if self.resumed_from else None, total_steps=cfg.train.steps,
        )
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.peak = peak_flops(self.env.device, cfg.log.peak_flops)

    # ------------------------------------------------------------ resume

    def _maybe_resume(self) -> None:
        if self.cfg.checkpoint.resume == "never":
            return
        latest = self.ckpt.latest()
        if latest is None:
            return
        meta = self.ckpt.load(latest, self.model, self.optimizer,
                              restore_rng=True)
        # The config wins over the checkpoint for settings the user may change on resume.
        for group, (base_lr, wd) in zip(self.optimizer.param_groups, self._group_settings):
            group["base_lr"], group["weight_decay"] = base_lr, wd
        self.loader.load_state_dict(meta["data"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.resumed_from = latest

    def _save(self) -> Path:
        meta = {
            "tokens": self.tokens,
            "data": self.loader.state_dict(),
            "world_size": self.env.world_size,
            "model_params": sum(p.numel() for p in self.model.parameters()),
        }
        return self.ckpt.save(self.step, self.model, self.optimizer, meta)

    # ------------------------------------------------------------ loop

    def _set_lr(self) -> float:
        mult = lr_multiplier(self.step, self.cfg.train.steps, self.cfg.optim.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        return self.optimizer.param_groups[0]["lr"]

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        batch = self.loader.next_batch(cfg.global_batch_size).to(self.env.device)
        micro = batch.split(cfg.train.micro_batch_size)
        loss_sum = torch.zeros((), device=self.env.device)
        for mb in micro:
            logits = forward(self.model, mb[:, :-1], cfg, self.data.eos_id)
            # Every micro-batch has the same token count, so the mean of means is the mean.
            loss = lm_loss(logits, mb[:, 1:]) / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def _should(self, every: int) -> bool:
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.train.steps

    def _log_eval(self) -> float:
        val = evaluate(self.model, self.data, self.cfg, self.env)
        record = {"step": self.step, "tokens": self.tokens, **val}
        self.metrics.log(record)
        self.metrics.console(record)
        return val["val_loss"]

    def run(self) -> TrainResult:
        cfg, log = self.cfg, self.metrics
        stop = StopFlag().install()
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(f"neotron: {n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f}"
                 f" MFLOP/token, {self.data.train.total_tokens:,} training tokens, device"
                 f" {self.env.device}")
        log.info("optimizer groups:\n" + routing_table(self.model))
        if self.resumed_from is not None:
            log.info(f"resumed from {self.resumed_from} (step {self.step})")
        self.model.train()
        last_val: float | None = None
        t_last, tokens_last = time.time(), self.tokens
        stopped_early = False
        if cfg.eval.at_start and self.step == 0:
            self._log_eval()
        while self.step < cfg.train.steps:
            lr = self._set_lr()
            loss, grad_norm = self._train_step()
            self.step += 1
            self.tokens += cfg.train.global_batch_tokens
            if self._should(cfg.log.every):
                loss_v, gnorm_v = loss.item(), grad_norm.item()
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"loss is {loss_v} at step {self.step}")
                now = time.time()
                tps = (self.tokens - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, self.tokens
                record: dict[str, Any] = {
                    "step": self.step, "loss": loss_v, "lr": lr, "grad_norm": gnorm_v,
                    "tokens": self.tokens, "tokens_per_s": tps,
                    "mfu": (self.flops_per_token * tps / (self.peak * self.env.world_size)
                            if self.peak else None),
                    **_memory_record(self.env.device),
                }
                log.log(record)
                log.console(record)
            if self._should(cfg.eval.every):
                last_val = self._log_eval()
            at_stop = cfg.train.stop_at_step is not None and self.step >= cfg.train.stop_at_step
            if self._should(cfg.checkpoint.every) or stop.requested or at_stop:
                path = self._save()
                log.info(f"saved checkpoint {path}")
            if stop.requested or at_stop:
                why = stop.signal_name or f"train.stop_at_step={cfg.train.stop_at_step}"
                log.info(f"stopping at step {self.step} ({why}); resume with the same command")
                stopped_early = self.step < cfg.train.steps
                break
        log.close()
        return TrainResult(self.step, self.tokens, stopped_early, last_val)


def train(cfg: RunConfig) -> TrainResult:
    return Trainer(cfg).run()
