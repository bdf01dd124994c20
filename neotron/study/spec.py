"""The study file: which models to train, on what budget, where; and its expansion into runs.

A study is data (STYLE.md: "a study is data too"): a YAML file, validated like a run config
(strict keys, one-line errors naming the key path), expanded here into one resolved run config
per (architecture, size, learning rate). docs/studies.md has the schema with an example.

    study_dir: runs/studies/demo
    baseline: llama                      # what the others are compared with (default: first)
    budget: {tokens_per_param: 20, param_count: non_embedding}   # or {tokens: 2.0e6}
    lr_multipliers: [0.5, 1, 2]          # optional sweep around each config's own lr
    overrides: [eval.every=50]           # applied to every run
    architectures:
      - name: llama
        config: ../demo/llama.yaml       # relative to the study file
        sizes:
          - {name: d64, overrides: [model.dim=64]}
          - {name: 20m, config: ../scaling/llama/20m.yaml}   # a size may name its own config
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from neotron.config import RunConfig, _format_error, apply_override, load_yaml_with_bases, validate
from neotron.errors import ConfigError
from neotron.strict import StrictModel

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.]*$"  # run names are "<arch>-<size>[-lrx<m>]"
Multipliers = list[Annotated[float, Field(gt=0)]]


def _check_unique(items: list, where: str) -> None:
    names = [x.name for x in items]
    for i, x in enumerate(items):
        if names.index(x.name) != i:
            raise ValueError(f"@{where}.{i}.name: '{x.name}' is used twice")


class BudgetSpec(StrictModel):
    tokens: float | None = Field(default=None, gt=0, description="fixed training tokens per run")
    tokens_per_param: float | None = Field(
        default=None, gt=0, description="training tokens per parameter (Chinchilla: ~20)"
    )
    param_count: Literal["non_embedding", "active", "total"] = Field(
        default="non_embedding", description="which parameter count tokens_per_param multiplies"
    )
    warmup_fraction: float | None = Field(
        default=None, ge=0, lt=1,
        description="set optim.schedule.warmup_steps to this fraction of each run's steps;"
        " None = keep each config's own",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> BudgetSpec:
        if (self.tokens is None) == (self.tokens_per_param is None):
            raise ValueError("@tokens: give exactly one of budget.tokens and"
                             " budget.tokens_per_param")
        return self


class SizeSpec(StrictModel):
    name: str = Field(pattern=NAME, description="names the run directory")
    config: str | None = Field(default=None, description="run config; default: the architecture's")
    overrides: list[str] = Field(default_factory=list, description="key.path=value for this size")


class ArchSpec(StrictModel):
    name: str = Field(pattern=NAME)
    config: str | None = Field(default=None, description="run config shared by the sizes")
    overrides: list[str] = Field(default_factory=list, description="applied before the size's")
    sizes: list[SizeSpec] = Field(min_length=1)
    lr_multipliers: Multipliers | None = Field(
        default=None, min_length=1, description="this architecture's sweep; None = the study's"
    )

    @model_validator(mode="after")
    def _check(self) -> ArchSpec:
        _check_unique(self.sizes, "sizes")
        for i, s in enumerate(self.sizes):
            if s.config is None and self.config is None:
                raise ValueError(f"@sizes.{i}.config: required (the architecture names no config)")
        return self


class SlurmSpec(StrictModel):
    nodes: int = Field(default=1, ge=1, description="nodes per run")
    gpus_per_node: int = Field(default=8, ge=1)
    time: str = Field(default="24:00:00", description="time limit per run (sbatch --time)")
    max_parallel: int | None = Field(default=None, ge=1, description="runs at once (array %N)")
    sbatch_args: list[str] = Field(
        default_factory=list, description="extra #SBATCH lines, e.g. --partition=gpu"
    )


class FitSpec(StrictModel):
    resamples: int = Field(default=1000, ge=0, description="bootstrap resamples per fit")
    seed: int = 0
    level: float = Field(default=0.95, gt=0, lt=1, description="confidence level of intervals")


class StudySpec(StrictModel):
    study_dir: str
    title: str | None = None
    baseline: str | None = Field(default=None, description="architecture name; default: first")
    executor: Literal["local", "slurm"] = "local"
    budget: BudgetSpec
    lr_multipliers: Multipliers = Field(
        default_factory=lambda: [1.0], min_length=1,
        description="multipliers of each config's learning rates; the best per size is fitted",
    )
    overrides: list[str] = Field(default_factory=list, description="applied to every run, last")
    architectures: list[ArchSpec] = Field(min_length=1)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    fit: FitSpec = Field(default_factory=FitSpec)

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        _check_unique(self.architectures, "architectures")
        names = [a.name for a in self.architectures]
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"@baseline: '{self.baseline}' is not one of the architectures"
                             f" ({', '.join(names)})")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.architectures[0].name


@dataclass(frozen=True)
class RunPlan:
    """One training run of the study, resolved: its config is final (steps set from the
    budget), its accounting computed on the meta device."""

    name: str
    arch: str
    size: str
    lr_multiplier: float
    cfg: RunConfig
    params_total: int
    params_active: int
    params_embedding: int
    params_non_embedding: int
    flops_per_token: float

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def tokens(self) -> int:
        return self.cfg.train.steps * self.cfg.train.global_batch_tokens

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def lr(self) -> float:
        return self.cfg.optim.lr


@dataclass(frozen=True)
class Study:
    spec: StudySpec
    path: Path  # the study file
    runs: list[RunPlan]

    @property
    def dir(self) -> Path:
        return Path(self.spec.study_dir)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read and validate a study file (`base:` inheritance and key=value overrides as for run
    configs); mistakes raise ConfigError with one line."""
    data = load_yaml_with_bases(path)
    for o in overrides:
        apply_override(data, o)
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid study {path}: {_format_error(e.errors()[0])}") from None


def _lr_overrides(data: dict, multiplier: float) -> None:
    """Scale every learning rate the run config sets (optim.lr and the per-group ones)."""
    optim = data.setdefault("optim", {})
    for key in ("lr", "adamw_lr", "sparse_lr"):
        if optim.get(key) is not None:
            optim[key] = float(optim[key]) * multiplier


def _resolve(config: Path, overrides: list[str], label: str) -> dict:
    data = load_yaml_with_bases(config)
    for o in overrides:
        try:
            apply_override(data, o)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
    return data


def _validated(data: dict, label: str) -> RunConfig:
    try:
        return validate(data)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None


def plan(spec: StudySpec, study_path: str | Path) -> Study:
    """Expand the study into its runs: resolved configs with steps from the budget rule."""
    from neotron.arch import build_model
    from neotron.arch.accounting import flops_per_token, param_counts

    study_path = Path(study_path)
    here = study_path.resolve().parent
    runs: list[RunPlan] = []
    for arch in spec.architectures:
        mults = arch.lr_multipliers or spec.lr_multipliers
        for size in arch.sizes:
            config = here / (size.config or arch.config)  # one is set (checked by the schema)
            base_name = f"{arch.name}-{size.name}"
            label = f"study run {base_name} ({config})"
            if not config.is_file():
                raise ConfigError(f"{label}: config file not found")
            data = _resolve(config, [*arch.overrides, *size.overrides, *spec.overrides], label)
            cfg = _validated(data, label)
            model = build_model(cfg.model)  # meta device: shapes only
            counts = param_counts(model)
            fpt = flops_per_token(model, cfg.data.seq_len)
            if spec.budget.tokens is not None:
                tokens = spec.budget.tokens
            else:
                tokens = spec.budget.tokens_per_param * getattr(counts, spec.budget.param_count)
            steps = max(1, math.ceil(tokens / cfg.train.global_batch_tokens))
            for m in mults:
                name = base_name if len(mults) == 1 else f"{base_name}-lrx{m:g}"
                d = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
                d["run_dir"] = str(Path(spec.study_dir) / "runs" / name)
                d.setdefault("train", {})["steps"] = steps
                d["train"].pop("stop_at_step", None)
                if spec.budget.warmup_fraction is not None:
                    sched = d.setdefault("optim", {}).setdefault("schedule", {})
                    sched["warmup_steps"] = int(spec.budget.warmup_fraction * steps)
                _lr_overrides(d, m)
                run_cfg = _validated(d, f"study run {name} ({config})")
                runs.append(RunPlan(
                    name=name, arch=arch.name, size=size.name, lr_multiplier=m, cfg=run_cfg,
                    params_total=counts.total, params_active=counts.active,
                    params_embedding=counts.embedding, params_non_embedding=counts.non_embedding,
                    flops_per_token=fpt,
                ))
    return Study(spec=spec, path=study_path, runs=runs)


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    return plan(load_spec(path, overrides), path)
