"""Typed run configuration: YAML in, a validated frozen `RunConfig` out.

- `base: other.yaml` inherits from another file (relative to the file naming it); mappings
  merge recursively, anything else (lists included) is replaced.
- `a.b.c=value` overrides are applied after inheritance; values are parsed as YAML scalars
  (`train.steps=100` is an int, `model.pattern=[a,b]` a list, `optim.lr=3e-4` a float).
- Every mistake raises `ConfigError` with one message naming the key path; the CLI prints it
  and exits with status 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from neotron.arch.config import ModelConfig
from neotron.arch.registry import FFNS, LINEARS, MIXERS
from neotron.data.config import DataConfig
from neotron.errors import ConfigError
from neotron.strict import StrictModel


class ScheduleConfig(StrictModel):
    name: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    decay_fraction: float = Field(
        default=0.2, gt=0.0, le=1.0, description="wsd: fraction of steps spent cooling down"
    )
    decay_shape: Literal["linear", "1-sqrt", "cosine"] = "1-sqrt"


class OptimConfig(StrictModel):
    """Optimizers per parameter group; routing rules and units in docs/optimizers.md."""

    name: Literal["adamw", "muon", "normuon"] = Field(
        default="adamw", description="optimizer of the hidden 2-D matrices; AdamW for the rest"
    )
    lr: float = Field(
        default=3e-4, gt=0,
        description="peak lr of the hidden matrices (and of everything else unless adamw_lr)",
    )
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW's")
    eps: float = Field(default=1e-8, gt=0, description="AdamW's")
    weight_decay: float = Field(default=0.1, ge=0, description="decoupled, of the hidden matrices")
    grad_clip: float = Field(default=1.0, ge=0, description="max global grad norm; 0 = off")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    adamw_lr: float | None = Field(
        default=None, gt=0,
        description="peak lr of the AdamW-trained params (embeddings, head, norms, ...); None = lr",
    )
    adamw_weight_decay: float | None = Field(
        default=None, ge=0,
        description="weight decay of the AdamW-trained matrices (untied head); None = weight_decay",
    )
    sparse_lr: float | None = Field(
        default=None, gt=0, description="peak lr of sparse lookup tables; None = the AdamW lr"
    )
    momentum: float = Field(default=0.95, ge=0, lt=1, description="muon/normuon")
    nesterov: bool = Field(default=True, description="muon/normuon")
    ns_steps: int = Field(default=5, ge=1, description="muon/normuon: Newton-Schulz iterations")
    adjust_lr: Literal["match_rms_adamw", "original"] = Field(
        default="match_rms_adamw",
        description="muon/normuon lr units: match_rms_adamw = AdamW's, original = Muon's (~0.02)",
    )
    beta2: float = Field(
        default=0.95, ge=0, lt=1, description="normuon: EMA of the per-row second moment"
    )

    @model_validator(mode="after")
    def _check_units(self) -> OptimConfig:
        if self.name != "adamw" and self.adjust_lr == "original" and self.adamw_lr is None:
            raise ValueError(
                "@adamw_lr: required when optim.adjust_lr=original: lr is then in Muon units"
                " (~0.02) and must not be used for the AdamW-trained parameters"
            )
        return self


class TrainConfig(StrictModel):
    steps: int = Field(default=1000, gt=0)
    seed: int = 0
    global_batch_tokens: int = Field(default=65536, gt=0, description="tokens per optimizer step")
    micro_batch_size: int = Field(default=8, gt=0, description="sequences per forward per rank")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto = bf16 autocast on CUDA, fp32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stop_at_step: int | None = Field(
        default=None,
        gt=0,
        description="save and exit at this step; the schedule still spans train.steps",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none",
        description="recompute each block's activations in backward: full = everything,"
        " selective = all but matmul/attention outputs",
    )
    compile: bool = Field(default=False, description="torch.compile each block")
    nan_policy: Literal["abort", "skip"] = Field(
        default="abort",
        description="on a non-finite loss or grad norm: abort the run, or skip the optimizer step",
    )
    max_consecutive_skips: int = Field(
        default=5, gt=0, description="nan_policy=skip: abort after this many skips in a row"
    )
    init_from: str | None = Field(
        default=None,
        description="run directory or checkpoint whose model weights start this run (weights"
        " only: fresh optimizer, schedule, step 0, data from the start); ignored when run_dir"
        " already has a checkpoint to resume (docs/quantization.md)",
    )


class EvalConfig(StrictModel):
    every: int = Field(default=100, ge=0, description="0 = only at the end")
    at_start: bool = Field(default=True, description="also evaluate before the first step")
    batches: int = Field(default=8, gt=0)
    batch_size: int = Field(default=8, gt=0)
    per_loop: bool = Field(
        default=False,
        description="recursive models: also the validation loss after each loop k (early exit:"
        " final norm and head on the residual stream after loop k), logged as val_loss_loop<k>"
        " (docs/recursion.md)")


class CheckpointConfig(StrictModel):
    # `async` is a Python keyword: the field is `async_`, spelt `async` in YAML and in dumps.
    model_config = ConfigDict(serialize_by_alias=True)

    every: int = Field(default=500, ge=0, description="0 = only at the end")
    keep_last: int = Field(default=2, ge=1)
    resume: Literal["auto", "never"] = Field(
        default="auto", description="auto = continue from run_dir's latest checkpoint if any"
    )
    async_: bool = Field(
        default=False,
        alias="async",
        description="write checkpoints in a background thread; the step only waits for the"
        " copy of the state to host memory",
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:  # overrides StrictModel's: knows `async`
        if isinstance(data, dict) and "async_" in data:
            raise ValueError("@async_: unknown key; did you mean 'async'?")
        if isinstance(data, dict) and "async" in data:
            data = {("async_" if k == "async" else k): v for k, v in data.items()}
            out = StrictModel._reject_unknown_keys.__func__(cls, data)
            return {("async" if k == "async_" else k): v for k, v in out.items()}
        return StrictModel._reject_unknown_keys.__func__(cls, data)


class WandbConfig(StrictModel):
    """Weights & Biases mirror of metrics.jsonl (rank 0 only; needs `pip install wandb`)."""

    project: str = Field(description="W&B project")
    entity: str | None = Field(default=None, description="W&B user or team; None = default")
    name: str | None = Field(default=None, description="run name; None = W&B's choice")
    group: str | None = Field(default=None, description="W&B run group (e.g. a study)")
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = Field(
        default="online", description="offline = write run files only (`wandb sync` later)")
    dir: str | None = Field(default=None, description="where wandb/ goes; None = run_dir")
    id: str | None = Field(
        default=None, description="fixed run id: a resumed run continues the same W&B run")


class ProfileConfig(StrictModel):
    """A torch.profiler trace of a few steps, and on CUDA a memory snapshot (docs/logging.md)."""

    start: int = Field(default=5, ge=1, description="first profiled step (1-based, as logged)")
    steps: int = Field(default=3, gt=0, description="number of profiled steps")
    dir: str | None = Field(default=None, description="output folder; None = run_dir/profile")
    memory: bool = Field(
        default=True, description="CUDA: record allocator history in the window and dump a"
        " memory snapshot at its end, and one on out-of-memory")


class LogConfig(StrictModel):
    every: int = Field(default=10, gt=0)
    tensorboard: bool = True
    peak_flops: float | None = Field(
        default=None, gt=0, description="per-device peak FLOP/s for MFU; None = from the device"
    )
    wandb: WandbConfig | None = Field(default=None, description="None = no W&B")
    profile: ProfileConfig | None = Field(default=None, description="None = no profiling")


class ParallelConfig(StrictModel):
    """Degrees of the device mesh (dp_replicate, dp_shard, tp); their product is the world size,
    which is only known at start-up: -1 (at most one) means "the rest of the world"."""

    dp_shard: int = Field(default=-1, ge=-1, description="FSDP degree; -1 = the rest of the world")
    dp_replicate: int = Field(
        default=1, ge=-1, description="replicas of the FSDP group (HSDP); 1 = plain FSDP"
    )
    tp: int = Field(default=1, ge=-1, description="tensor-parallel degree (heads, FFN, vocab)")
    timeout_s: float = Field(
        default=600.0, gt=0, description="process-group timeout: a collective waiting longer fails"
    )

    @model_validator(mode="after")
    def _check_degrees(self) -> ParallelConfig:
        for key in ("dp_shard", "dp_replicate", "tp"):
            if getattr(self, key) == 0:
                raise ValueError(f"@{key}: must be a positive degree or -1 (the rest), got 0")
        auto = [k for k in ("dp_replicate", "dp_shard", "tp") if getattr(self, k) == -1]
        if len(auto) > 1:
            raise ValueError(f"@{auto[1]}: only one of {', '.join(auto)} may be -1")
        return self


class RunConfig(StrictModel):
    run_dir: str
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        T = self.data.seq_len
        if T > self.model.max_seq_len:
            raise ValueError(
                f"@data.seq_len: {T} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        per_step = T * self.train.micro_batch_size
        if self.train.global_batch_tokens % per_step:
            raise ValueError(
                f"@train.global_batch_tokens: {self.train.global_batch_tokens} is not a multiple"
                f" of data.seq_len * train.micro_batch_size = {per_step}"
            )
        if self.data.tokenizer.path is None and self.data.tokenizer.vocab_size > self.model.vocab_size:
            raise ValueError(
                f"@model.vocab_size: {self.model.vocab_size} is smaller than the tokenizer's"
                f" data.tokenizer.vocab_size={self.data.tokenizer.vocab_size}"
            )
        if self.parallel.tp > 1:
            # Shapes that tensor parallelism splits must divide by tp (the plans live next to
            # the blocks' code, in arch/tp_plans.py). tp = -1 is checked at start-up.
            from neotron.arch.tp_plans import tp_config_errors

            for key, msg in tp_config_errors(self.model, self.parallel.tp):
                raise ValueError(f"@model.{key}: {msg}")
        loops = self.model.recursion.loops if self.model.recursion is not None else 1
        if self.eval.per_loop and loops == 1:
            raise ValueError("@eval.per_loop: needs a looped model (model.recursion.loops > 1)")
        if self.optim.schedule.warmup_steps >= self.train.steps and self.train.steps > 1:
            raise ValueError(
                f"@optim.schedule.warmup_steps: {self.optim.schedule.warmup_steps} is not"
                f" below train.steps={self.train.steps}"
            )
        return self

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step."""
        return self.train.global_batch_tokens // self.data.seq_len


# ---------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_with_bases(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"base: inheritance cycle: {chain}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict[str, Any] = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: base: must be a file name or a list of them")
        merged = _merge(merged, load_yaml_with_bases(path.parent / b, (*_seen, path)))
    return _merge(merged, data)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; list items are addressed by index."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{override}': empty key in '{path}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{override}': value is not valid YAML: {e}") from None
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, key, where)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{'.'.join(keys[:i])}' is not a mapping")
        node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override '{override}': '{'.'.join(keys[:-1])}' is not a mapping")


def _list_index(node: list, key: str, where: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"override: '{where}' indexes a list of {len(node)} items")
    return int(key)


def _format_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    # Discriminated unions put the layer type in the location (mixer.attention.n_heads); the
    # user wrote no such key, so drop it.
    kinds = {"mixer": MIXERS, "ffn": FFNS, "linear": LINEARS}
    loc = [
        p for i, p in enumerate(loc) if not (i and loc[i - 1] in kinds and p in kinds[loc[i - 1]].names())
    ]
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("@"):  # a check that names its key relative to where it ran
        sub, msg = msg[1:].split(": ", 1)
        loc += sub.split(".")
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return f"{'.'.join(loc) or '<top level>'}: {msg}"


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # Discriminated unions report the tag in the location (mixer.attention.n_heads); keep it,
        # it tells the user which layer type's schema applied.
        lines = [_format_error(err) for err in errors[:5]]
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        if len(lines) == 1:  # the common case: one line, as for every other console error
            raise ConfigError(f"invalid config: {lines[0]}") from None
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines) + more) from None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (with its `base:` chain), apply overrides, validate."""
    data = load_yaml_with_bases(path)
    for o in overrides:
        apply_override(data, o)
    return validate(data)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
