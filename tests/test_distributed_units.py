"""Pieces of the distributed engine: mesh degrees and config checks, tensor-parallel plans
(tied and untied heads) and FSDP2 evaluation against a single-device model in 2 gloo processes
(one torchrun of this file), activation checkpointing and torch.compile in one process.

Run as a script by torchrun (`_worker`), this file is the 2-rank side of
`test_tp_plans_and_fsdp_eval_in_two_processes`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo" / "llama.yaml")
TINY = [
    "run_dir=/tmp/neotron-unused", "data.tokenizer.vocab_size=512", "model.vocab_size=512",
    "model.dim=32", "model.n_layers=2", "model.blocks.attention.mixer.n_heads=4",
    "model.blocks.attention.mixer.n_kv_heads=2", "data.seq_len=16",
    "train.global_batch_tokens=128", "train.micro_batch_size=4", "eval.batch_size=4",
    "eval.batches=2",
]


def tiny_cfg(*extra: str):
    from neotron.config import load

    return load(DEMO, [*TINY, *extra])


def batch(seed: int, rows: int = 4, seq: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (rows, seq + 1), generator=g)


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())


# ----------------------------------------------------------------- config and mesh degrees


def test_resolve_dims_fills_the_rest_and_reports_mismatches():
    from neotron.errors import ConfigError
    from neotron.train.parallel import ParallelDims, resolve_dims

    par = tiny_cfg("parallel.tp=2").parallel
    assert resolve_dims(par, 8) == ParallelDims(dp_replicate=1, dp_shard=4, tp=2)
    par = tiny_cfg("parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.tp=-1").parallel
    assert resolve_dims(par, 8) == ParallelDims(2, 2, 2)
    with pytest.raises(ConfigError, match="not divisible by the fixed degrees"):
        resolve_dims(tiny_cfg("parallel.tp=2").parallel, 3)
    with pytest.raises(ConfigError, match=r"= 4, but 8 processes"):
        resolve_dims(tiny_cfg("parallel.dp_shard=2", "parallel.tp=2").parallel, 8)


@pytest.mark.parametrize("overrides, where", [
    (["parallel.tp=4", "model.blocks.attention.mixer.n_kv_heads=2"],
     "model.blocks.attention.mixer.n_kv_heads: n_kv_heads=2 is not divisible by parallel.tp=4"),
    (["parallel.tp=3", "model.blocks.attention.mixer.n_heads=6",
      "model.blocks.attention.mixer.n_kv_heads=3", "model.dim=36"],
     "model.vocab_size: vocab_size=512 is not divisible by parallel.tp=3"),
    (["parallel.tp=2", "model.blocks.attention.ffn.hidden_dim=33"],
     "model.blocks.attention.ffn.hidden_dim: hidden_dim=33 is not divisible by parallel.tp=2"),
    (["parallel.dp_shard=0"], "parallel.dp_shard: must be a positive degree or -1"),
    (["parallel.tp=-1"], "parallel.tp: only one of dp_shard, tp may be -1"),
])
def test_parallel_config_errors_name_the_key(overrides, where):
    from neotron.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_cfg(*overrides)
    assert where in str(e.value)


def test_blocks_without_a_tp_plan_are_refused_under_tp():
    from neotron.arch import build_model
    from neotron.arch.config import ModelConfig
    from neotron.arch.tp_plans import tp_config_errors, unplanned_parameters

    model_cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2,
                            blocks={"delta": {"mixer": {"type": "deltanet"}}})
    errors = tp_config_errors(model_cfg, 2)
    assert errors[0][0] == "blocks.delta.mixer.type", errors
    assert "mixer type 'deltanet' has no tensor-parallel plan (data-parallel only)" in errors[0][1]
    missing = unplanned_parameters(build_model(model_cfg))
    assert missing and "layers.0.mixer" in missing[0]
    assert unplanned_parameters(build_model(tiny_cfg().model)) == []  # attention + swiglu


def test_checkpoint_async_is_spelt_async():
    from neotron.config import to_yaml
    from neotron.errors import ConfigError

    cfg = tiny_cfg("checkpoint.async=true")
    assert cfg.checkpoint.async_ is True
    assert "async: true" in to_yaml(cfg)
    with pytest.raises(ConfigError, match="did you mean 'async'"):
        tiny_cfg("checkpoint.async_=true")


def test_slurm_template_is_valid_bash():
    script = ROOT / "neotron" / "launch" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "srun" in text and "torchrun" in text and "--rdzv_backend c10d" in text


# ----------------------------------------------------------------- one process: AC, compile


def _model(cfg):
    from neotron.arch import build_model, materialize
    from neotron.train.parallel import DistEnv, parallelize

    model = materialize(build_model(cfg.model), "cpu", 0)
    return parallelize(model, DistEnv(), cfg.train)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients_same_names(mode):
    plain = _model(tiny_cfg())
    ac = _model(tiny_cfg(f"train.activation_checkpointing={mode}"))
    assert list(plain.state_dict()) == list(ac.state_dict())  # checkpoints do not change
    x = batch(0)
    loss_of(plain, x).backward()
    loss_of(ac, x).backward()
    for (name, p), q in zip(plain.named_parameters(), ac.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_compile_each_block_matches_eager(monkeypatch, ac):
    monkeypatch.setenv("NEOTRON_COMPILE_BACKEND", "aot_eager")  # no C++ build in CI
    plain = _model(tiny_cfg())
    compiled = _model(tiny_cfg("train.compile=true", f"train.activation_checkpointing={ac}"))
    x = batch(1)
    a, b = loss_of(plain, x), loss_of(compiled, x)
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), abs=1e-5)
    for p, q in zip(plain.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- convert


def test_convert_exports_consolidated_safetensors(tmp_path):
    from safetensors.torch import load_file

    from neotron.arch import build_model, materialize
    from neotron.cli import main
    from neotron.train.checkpoint import Checkpointer

    cfg = tiny_cfg()
    model = materialize(build_model(cfg.model), "cpu", 3)
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run_dir: x\n")
    Checkpointer(run / "checkpoints", keep_last=1).save(5, model, opt, {"tokens": 7})
    assert main(["convert", str(run), str(tmp_path / "out")]) == 0
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tensors.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v), k
    info = json.loads((tmp_path / "out" / "neotron.json").read_text())
    assert info["step"] == 5 and info["tokens"] == 7 and info["config"]
    assert (tmp_path / "out" / "config.yaml").read_text() == "run_dir: x\n"
    # a bare checkpoint directory, cast to bf16; a non-empty OUT needs --force
    step = run / "checkpoints" / "step_00000005"
    assert main(["convert", str(step), str(tmp_path / "out"), "--dtype", "bf16"]) == 2
    assert main(["convert", str(step), str(tmp_path / "out"), "--dtype", "bf16", "--force"]) == 0
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["embed.weight"].dtype == \
        torch.bfloat16


# ----------------------------------------------------------------- two processes


def test_tp_plans_and_fsdp_eval_in_two_processes(tmp_path):
    from tests.test_distributed import LAUNCH_ENV, free_port

    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", __file__,
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **LAUNCH_ENV, "PYTHONPATH": str(ROOT)})
    print(f"torchrun x2 units: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["pg_timeout_s"] == 321  # parallel.timeout_s
    for tie in ("tied", "untied"):
        r = res[f"tp_{tie}"]
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5 and r["norm_diff"] < 1e-5, r
    ev = res["fsdp_eval"]
    # The state the no_grad pitfall needs (root parameters left unsharded by a no_grad
    # forward) is there without the fix and gone after evaluate(), which reshards.
    assert ev["unsharded_after_plain_no_grad"], ev
    assert ev["sharded_after_evaluate"], ev
    assert ev["grad_diff"] < 1e-5 and ev["norm_diff"] < 1e-5 and ev["val_diff"] < 1e-5, ev


class _Shards:
    """A stand-in ShardSet: a fixed random token stream."""

    def __init__(self, n: int) -> None:
        self.tokens = np.random.default_rng(0).integers(0, 512, n)
        self.total_tokens = n

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


def _grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
            for n, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _worker(outdir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from neotron.arch import build_model, materialize
    from neotron.train.parallel import all_reduce_sum, grad_sq_norm, parallelize, setup_env
    from neotron.train.trainer import evaluate

    results: dict = {}
    for tie in ("tied", "untied"):
        cfg = tiny_cfg("parallel.tp=2", f"model.tie_embeddings={tie == 'tied'}",
                       "parallel.timeout_s=321")
        env = setup_env(cfg)  # the first call creates the process group
        gloo = dist.group.WORLD._get_backend(torch.device("cpu"))
        results["pg_timeout_s"] = gloo.options._timeout.total_seconds()
        ref = materialize(build_model(cfg.model), "cpu", 0)
        model = parallelize(materialize(build_model(cfg.model), "cpu", 0), env, cfg.train)
        x = batch(2)
        lm, lr = loss_of(model, x), loss_of(ref, x)
        lm.backward()
        lr.backward()
        norm = all_reduce_sum(grad_sq_norm(list(model.parameters()), env.world_size), env).sqrt()
        ref_norm = grad_sq_norm(list(ref.parameters()), 1).sqrt()
        assert isinstance(model.embed.weight, DTensor)  # vocab-parallel
        results[f"tp_{tie}"] = {"loss_diff": abs(lm.item() - lr.item()),
                                "grad_diff": _max_diff(_grads(model), _grads(ref)),
                                "norm_diff": abs(norm.item() - ref_norm.item())}

    # FSDP2 on 2 ranks: evaluate() (a no_grad forward), then a training step
    cfg = tiny_cfg()
    env = setup_env(cfg)
    ref = materialize(build_model(cfg.model), "cpu", 0)
    model = parallelize(materialize(build_model(cfg.model), "cpu", 0), env, cfg.train)
    with torch.no_grad():  # a bare no_grad forward: the root keeps its gathered parameters
        model(batch(3)[:, :-1])
    unsharded = not isinstance(model.embed.weight, DTensor)
    data = SimpleNamespace(val=_Shards(4096), eos_id=0)
    val = evaluate(model, data, cfg, env)["val_loss"]
    ref_val = evaluate(ref, data, cfg, SimpleNamespace(
        dp_rank=0, dp_world=1, device=torch.device("cpu"), fsdp=False, autocast=False,
        distributed=False))["val_loss"]
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    x = batch(4)
    rows = x.shape[0] // env.dp_world
    loss_of(model, x[env.dp_rank * rows:(env.dp_rank + 1) * rows]).backward()
    loss_of(ref, x).backward()
    norm = all_reduce_sum(grad_sq_norm(list(model.parameters()), env.world_size), env).sqrt()
    ref_norm = grad_sq_norm(list(ref.parameters()), 1).sqrt()
    results["fsdp_eval"] = {"unsharded_after_plain_no_grad": unsharded,
                            "sharded_after_evaluate": sharded,
                            "val_diff": abs(val - ref_val),
                            "grad_diff": _max_diff(_grads(model), _grads(ref)),
                            "norm_diff": abs(norm.item() - ref_norm.item())}
    if env.rank == 0:
        (Path(outdir) / "rank0.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1])
