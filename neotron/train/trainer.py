"""The training loop: data -> model -> optimizer -> metrics, evaluation and checkpoints.

The loop is written so that a run resumed from a checkpoint takes exactly the same steps as an
uninterrupted one: the data position, optimizer state, RNG state and step are restored, and the
learning rate is a pure function of the step (optim/schedules.py).

The same loop runs in one process or under torchrun (train/parallel.py builds the mesh and
wraps the model). Each step ends with one all-reduce of a small vector (this rank's share of
the squared gradient norm, its loss, its stop request) and one host sync to read it: that
gives the global grad norm for clipping, the logged loss averaged over data-parallel ranks,
the non-finite check of `train.nan_policy`, and a stop decision every rank agrees on.
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
from neotron.arch.lora import collect_aux, stats_to_floats
from neotron.arch.memory import clip_sparse_grads_, dense_params, sparse_params
from neotron.arch.quant import set_quant_step
from neotron.arch.stack import loop_exits, param_summary
from neotron.config import RunConfig, to_yaml
from neotron.data.loader import TokenLoader, ValLoader
from neotron.data.prepare import PreparedData, prepare
from neotron.errors import ConfigError
from neotron.optim.builder import build_optimizer, routing_table
from neotron.optim.schedules import lr_multiplier, ramp_factor
from neotron.train.checkpoint import Checkpointer, read_meta
from neotron.train.faults import FaultPlan, StopFlag
from neotron.train.init_from import init_from
from neotron.train.metrics import MetricsLogger, peak_flops
from neotron.train.parallel import (
    DistEnv,
    all_reduce_sum,
    barrier,
    clip_grads_,
    grad_sq_norm,
    parallelize,
    reshard_after_no_grad,
    setup_env,
    teardown,
)
from neotron.train.profiling import StepProfiler
from neotron.train.safe_reader import CheckpointError


@dataclass
class TrainResult:
    step: int
    tokens: int
    stopped_early: bool
    last_val_loss: float | None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def forward(model: torch.nn.Module, inputs: torch.Tensor, cfg: RunConfig, eos_id: int,
            env: DistEnv | None = None):
    """Logits for a batch; with data.document_masking, documents packed into one row are
    kept apart (attention masked across them, recurrent state reset, positions restarted)."""
    eos = eos_id if cfg.data.document_masking else None
    with autocast_for(cfg, inputs.device, env):
        return model(inputs, SeqInfo.for_tokens(inputs, eos))


def autocast_for(cfg: RunConfig, device: torch.device, env: DistEnv | None = None):
    """bf16 autocast when the run computes in bf16 and FSDP2 is not already casting the
    parameters (its MixedPrecisionPolicy does that under data parallelism)."""
    if env is not None:
        use = env.autocast
    else:
        precision = cfg.train.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        use = precision == "bf16"
    if use:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: PreparedData, cfg: RunConfig, env: DistEnv) -> dict:
    """Loss and perplexity on the same held-out windows every time; each data-parallel rank
    evaluates its slice of every batch, and the sums are all-reduced (one sync at the end).
    With `eval.per_loop`, also the loss of each loop's early exit, `val_loss_loop<k>` (k = 1..K;
    the last is val_loss), from the same forward (arch/stack.py `loop_exits`)."""
    was_training = model.training
    model.eval()
    batches = ValLoader(data.val, cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.batches,
                        dp_rank=env.dp_rank, dp_world=env.dp_world)
    exits = loop_exits(model) if cfg.eval.per_loop else nullcontext(1)
    with exits as n_exits:
        # [sum of per-row losses of each exit, rows], accumulated on the device in float64
        total = torch.zeros(n_exits + 1, dtype=torch.float64, device=env.device)
        for batch in batches:
            batch = batch.to(env.device)
            logits = forward(model, batch[:, :-1], cfg, data.eos_id, env)
            rows = batch.shape[0]
            for k, exit_logits in enumerate(logits.chunk(n_exits)):
                total[k] += lm_loss(exit_logits, batch[:, 1:]).double() * rows
            total[-1] += rows
    if env.fsdp:
        reshard_after_no_grad(model)
    # tensor-parallel ranks of one data-parallel group count the same rows: the ratio is right
    total = all_reduce_sum(total, env)
    losses = (total[:-1] / total[-1]).tolist()
    model.train(was_training)
    out = {"val_loss": losses[-1], "val_ppl": math.exp(min(losses[-1], 50.0))}
    if cfg.eval.per_loop:
        out.update({f"val_loss_loop{k}": v for k, v in enumerate(losses, 1)})
    return out


@dataclass
class StepStats:
    loss: float  # mean over data-parallel ranks
    grad_norm: float  # global, before clipping
    finite: bool  # loss and grad norm finite: the optimizer stepped
    stop: bool  # some rank asked to stop (SIGTERM/SIGINT): all stop after this step


def _memory_record(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is KiB on Linux
    return {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.env = env = setup_env(cfg)
        self.run_dir = Path(cfg.run_dir)
        self._check_batch_layout()
        self.data = self._prepare_data()
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's"
                f" {self.data.vocab_size} tokens ({self.data.tokenizer_path}); set it to at"
                f" least {self.data.vocab_size}"
            )
        # Every rank builds the whole model from the same seed, then parallelize() keeps its
        # shards: the weights are those of a single-process run whatever the layout.
        model = materialize(build_model(cfg.model), env.device, cfg.train.seed)
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.arch_note = param_summary(model)  # unique params and depth of a recursive stack
        self.router_stats: dict[str, torch.Tensor] = {}  # MoL router statistics, last step
        self.model = parallelize(model, env, cfg.train)
        if cfg.train.init_from is not None:  # weights only; a checkpoint to resume wins
            init_from(self.model, cfg, is_main=env.is_main)
        # Sparse tables (memory values, hash tables) are clipped apart from the rest, each by
        # its own limit; the global norm, clipping and NaN check cover the dense parameters.
        self.has_sparse = bool(sparse_params(self.model))
        self.params = [p for p in dense_params(self.model) if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self._group_settings = [(g["base_lr"], g["weight_decay"], g.get("lr_ramp"))
                                for g in self.optimizer.param_groups]
        self.loader = TokenLoader(self.data.train, cfg.data.seq_len, cfg.train.seed,
                                  dp_rank=env.dp_rank, dp_world=env.dp_world)
        # The run evaluates at its last step at least: a val split too short for one batch
        # is refused now, not after training (reads no data).
        ValLoader(self.data.val, cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.batches,
                  dp_rank=env.dp_rank, dp_world=env.dp_world)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                 is_writer=env.is_main, async_save=cfg.checkpoint.async_,
                                 process_group=env.ckpt_group)
        self.faults = FaultPlan(env.rank)
        self.stop = StopFlag()
        self.step = 0
        self.tokens = 0
        self.skipped = 0  # optimizer steps skipped by nan_policy=skip, in the whole run
        self.consecutive_skips = 0
        self.resumed_from: Path | None = None
        self._rng_warning: str | None = None
        # Seed after building so the first step's RNG does not depend on how many random
        # numbers initialization drew (a resumed run restores this state from the checkpoint).
        # Data-parallel ranks get distinct streams; tensor-parallel ranks of one group share one.
        torch.manual_seed(cfg.train.seed + 1 + env.dp_rank)
        self._maybe_resume()
        # Written only now: a resume refused above leaves the run directory as it was.
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.metrics = MetricsLogger(
            self.run_dir, is_writer=env.is_main, tensorboard=cfg.log.tensorboard,
            resume_step=self.step if self.resumed_from else None, total_steps=cfg.train.steps,
            run_config=cfg,  # config text + hparams in TensorBoard; log.wandb
        )
        self.profiler = StepProfiler(cfg.log.profile, self.run_dir, env.device, env.rank)
        self.peak = peak_flops(env.device, cfg.log.peak_flops)

    def _check_batch_layout(self) -> None:
        """What the config alone could not check: the batches must split over this run's
        data-parallel ranks (the world size is only known now)."""
        cfg, dp = self.cfg, self.env.dp_world
        gbs, micro = cfg.global_batch_size, cfg.train.micro_batch_size
        if gbs % dp or (gbs // dp) % micro:
            raise ConfigError(
                f"train.global_batch_tokens={cfg.train.global_batch_tokens} gives {gbs} sequences"
                f" per step, which do not split into {dp} data-parallel ranks x whole"
                f" micro-batches of train.micro_batch_size={micro}; make it a multiple of"
                f" {dp * micro * cfg.data.seq_len} tokens (or change the layout: {self.env.dims})"
            )
        if cfg.eval.batch_size % dp:
            raise ConfigError(
                f"eval.batch_size={cfg.eval.batch_size} is not divisible by the {dp}"
                " data-parallel ranks"
            )

    def _prepare_data(self) -> PreparedData:
        """Tokenize once, not once per rank: rank 0 first, then the first rank of every other
        node (for node-local data dirs; a no-op on a shared file system), then the rest."""
        if self.env.distributed:
            if self.env.is_main:
                prepare(self.cfg.data)
            barrier()
            if self.env.local_rank == 0 and not self.env.is_main:
                prepare(self.cfg.data)
            barrier()
        return prepare(self.cfg.data)

    # ------------------------------------------------------------ resume

    def _maybe_resume(self) -> None:
        if self.cfg.checkpoint.resume == "never":
            return
        latest = self.ckpt.latest()
        if latest is None:
            return
        self._check_resumable(latest, read_meta(latest))
        meta = self.ckpt.load(latest, self.model, self.optimizer, restore_rng=True)
        if self.ckpt.rng_restored is False:
            self._rng_warning = (
                f"warning: {latest.name} was written by {meta.get('world_size', 1)} process(es),"
                f" this run has {self.env.world_size}: model, optimizer and data position are"
                " resharded, but the RNG states are not restored (fresh seeds per rank)"
            )
        # The config wins over the checkpoint for settings the user may change on resume.
        for group, (base_lr, wd, ramp) in zip(self.optimizer.param_groups, self._group_settings):
            group["base_lr"], group["weight_decay"] = base_lr, wd
            group.pop("lr_ramp", None)
            if ramp is not None:
                group["lr_ramp"] = ramp
        try:
            self.loader.load_state_dict(meta["data"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{latest / 'meta.json'}: data position does not fit this"
                                  f" run: {e}") from None
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.skipped = int(meta.get("skipped_steps", 0))
        self.consecutive_skips = int(meta.get("consecutive_skips", 0))
        self.resumed_from = latest

    def _check_resumable(self, latest: Path, meta: dict[str, Any]) -> None:
        """What the checkpoint's tensors cannot show: the run's sequence length and seed.
        (Model shapes are checked tensor by tensor when loading.)"""
        saved = meta.get("seq_len")
        if saved is not None and saved != self.cfg.data.seq_len:
            raise ConfigError(
                f"data.seq_len: {latest} was trained with {saved}, this config has"
                f" {self.cfg.data.seq_len}; the data position counts windows of the original"
                " length, so resume with it (or start a new run_dir)"
            )

    def _save(self) -> Path:
        meta = {
            "seq_len": self.cfg.data.seq_len,
            "tokens": self.tokens,
            "data": self.loader.state_dict(),
            "world_size": self.env.world_size,
            "parallel": list(self.env.dims.shape),
            "model_params": self.n_params,
            "skipped_steps": self.skipped,
            "consecutive_skips": self.consecutive_skips,
        }
        return self.ckpt.save(self.step, self.model, self.optimizer, meta)

    # ------------------------------------------------------------ loop

    def _set_lr(self) -> float:
        mult = lr_multiplier(self.step, self.cfg.train.steps, self.cfg.optim.schedule)
        for group in self.optimizer.param_groups:
            ramp = group.get("lr_ramp")  # a block's own multiplier ramp (UltraMem values)
            extra = 1.0 if ramp is None else ramp_factor(self.step, self.cfg.train.steps, ramp)
            group["lr"] = group["base_lr"] * mult * extra
        return self.optimizer.param_groups[0]["lr"]

    def _train_step(self) -> StepStats:
        cfg, env = self.cfg, self.env
        batch = self.loader.next_batch(cfg.global_batch_size).to(env.device)
        micro = batch.split(cfg.train.micro_batch_size)
        loss_sum = torch.zeros((), device=env.device)
        poison = self.faults.nan_at(self.step + 1)
        for mb in micro:
            logits = forward(self.model, mb[:, :-1], cfg, self.data.eos_id, env)
            # Every micro-batch has the same token count, so the mean of means is the mean.
            loss = lm_loss(logits, mb[:, 1:]) / len(micro)
            if poison:
                loss = loss * float("nan")
            aux, self.router_stats = collect_aux(self.model)  # MoL balance loss, or None
            (loss if aux is None else loss + aux / len(micro)).backward()
            loss_sum += loss.detach()
        sparse_ok = True
        if self.has_sparse:  # only models with memory tables pay for this (it syncs)
            sparse_norm = clip_sparse_grads_(self.model, cfg.optim.grad_clip)
            sparse_ok = math.isfinite(float(sparse_norm))
        # One all-reduce: [this rank's share of |grad|^2, its loss, its stop request].
        stats = torch.stack([
            grad_sq_norm(self.params, env.world_size),
            loss_sum.float(),
            torch.tensor(float(self.stop.requested), device=env.device),
        ])
        stats = all_reduce_sum(stats, env)
        grad_norm = stats[0].sqrt()
        if cfg.optim.grad_clip > 0:
            clip_grads_(self.params, cfg.optim.grad_clip, grad_norm)  # on the device, no sync
        sq, loss_total, stop = stats.tolist()  # the step's one host sync
        finite = math.isfinite(sq) and math.isfinite(loss_total) and sparse_ok
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss=loss_total / env.world_size, grad_norm=math.sqrt(sq),
                         finite=finite, stop=stop > 0)

    def _on_non_finite(self, st: StepStats) -> None:
        what = f"loss {st.loss} / grad norm {st.grad_norm} at step {self.step} is not finite"
        if self.cfg.train.nan_policy == "abort":
            raise FloatingPointError(f"{what} (train.nan_policy=abort; the update was not applied)")
        self.skipped += 1
        self.consecutive_skips += 1
        limit = self.cfg.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise FloatingPointError(
                f"{what}: {self.consecutive_skips} optimizer steps skipped in a row"
                f" (train.max_consecutive_skips={limit}); giving up"
            )
        self.metrics.info(f"{what}: optimizer step skipped ({self.consecutive_skips} in a row,"
                          f" {self.skipped} in the run)")

    def _should(self, every: int) -> bool:
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.train.steps

    def _log_eval(self) -> float:
        val = evaluate(self.model, self.data, self.cfg, self.env)
        record = {"step": self.step, "tokens": self.tokens, **val}
        self.metrics.log(record)
        self.metrics.console(record)
        if self.cfg.eval.per_loop:
            exits = [v for k, v in val.items() if k.startswith("val_loss_loop")]  # k = 1..K
            self.metrics.info("val_loss after each loop: "
                              + " | ".join(f"loop {k} {v:.4f}" for k, v in enumerate(exits, 1)))
        return val["val_loss"]

    def run(self) -> TrainResult:
        try:
            result = self._run()
        except BaseException:
            # Leave a background checkpoint write unfinished (never renamed into place: the
            # previous checkpoint stays `latest`) rather than wait on peers that may be gone.
            self.profiler.close()
            self.metrics.close()
            self.stop.uninstall()
            raise
        self.profiler.close()
        self.metrics.close()
        self.stop.uninstall()
        teardown(self.env)
        return result

    def _run(self) -> TrainResult:
        cfg, log, env = self.cfg, self.metrics, self.env
        self.stop.install()
        log.info(f"neotron: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f}"
                 f" MFLOP/token, {self.data.train.total_tokens:,} training tokens, device"
                 f" {env.device}")
        if self.arch_note:
            log.info(self.arch_note)
        if env.distributed:
            d = env.dims
            log.info(f"parallel: {env.world_size} processes = dp_replicate {d.dp_replicate} x"
                     f" dp_shard {d.dp_shard} x tp {d.tp}; precision {env.precision}")
        log.info("optimizer groups:\n" + routing_table(self.model, cfg.optim))
        if self.resumed_from is not None:
            log.info(f"resumed from {self.resumed_from} (step {self.step})")
        if self._rng_warning:
            log.info(self._rng_warning)
        self.model.train()
        last_val: float | None = None
        t_last, tokens_last = time.time(), self.tokens
        stopped_early = False
        if cfg.eval.at_start and self.step == 0:
            self._log_eval()
        while self.step < cfg.train.steps:
            self.faults.before_step(self.step + 1)
            lr = self._set_lr()
            set_quant_step(self.model, self.step)  # gradual quantization's lam (arch/quant)
            with self.profiler.step(self.step + 1):  # log.profile; on CUDA dumps on OOM
                st = self._train_step()
            self.step += 1
            self.tokens += cfg.train.global_batch_tokens
            if st.finite:
                self.consecutive_skips = 0
            else:
                self._on_non_finite(st)
            done = self.ckpt.poll()
            if done is not None:
                log.info(f"saved checkpoint {done}")
            if self._should(cfg.log.every):
                now = time.time()
                tps = (self.tokens - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, self.tokens
                record: dict[str, Any] = {
                    "step": self.step, "loss": st.loss if st.finite else None, "lr": lr,
                    "grad_norm": st.grad_norm if st.finite else None,
                    "tokens": self.tokens, "tokens_per_s": tps,
                    "mfu": (self.flops_per_token * tps / (self.peak * env.world_size)
                            if self.peak else None),
                    "skipped_steps": self.skipped,
                    **_memory_record(env.device),
                    **stats_to_floats(self.router_stats),
                }
                log.log(record)
                log.console(record)
            if self._should(cfg.eval.every):
                last_val = self._log_eval()
            at_stop = cfg.train.stop_at_step is not None and self.step >= cfg.train.stop_at_step
            if self._should(cfg.checkpoint.every) or st.stop or at_stop:
                done = self.ckpt.wait()  # the previous background write, if still going
                if done is not None:
                    log.info(f"saved checkpoint {done}")
                path = self._save()
                if self.ckpt.pending:
                    log.info(f"checkpoint {path.name}: state staged, writing in the background")
                else:
                    log.info(f"saved checkpoint {path}")
            if st.stop or at_stop:
                why = (self.stop.signal_name or "a stop request on another rank") if st.stop \
                    else f"train.stop_at_step={cfg.train.stop_at_step}"
                log.info(f"stopping at step {self.step} ({why}); resume with the same command")
                stopped_early = self.step < cfg.train.steps
                break
        done = self.ckpt.wait()
        if done is not None:
            log.info(f"saved checkpoint {done}")
        return TrainResult(self.step, self.tokens, stopped_early, last_val)


def train(cfg: RunConfig) -> TrainResult:
    return Trainer(cfg).run()
