"""BitNet's absmean scale is the whole weight's under sharding (2 gloo processes, one torchrun
of this file): on a DTensor sharded by rows or by columns (uneven shards included), and through
FSDP2, where a sharded BitLinear model must give the single-process outputs and gradients.
Compared with the unsharded computation in fp64; the local shard's own absmean is checked to
differ, so a shard-local scale could not pass. Also `train.init_from` into an FSDP2-sharded
model: every rank's shard holds the parent checkpoint's values.

Run as a script by torchrun (`_worker`), this file is the 2-rank side of the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_absmean_equals_unsharded_in_two_processes(tmp_path, trained_run):
    from tests.test_distributed import LAUNCH_ENV, free_port

    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", __file__,
         str(tmp_path), str(trained_run)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **LAUNCH_ENV, "PYTHONPATH": str(ROOT)})
    print(f"torchrun x2 quant: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    res = json.loads((tmp_path / "rank0.json").read_text())
    for placement in ("rows", "cols"):
        r = res[placement]
        assert r["scale_diff"] < 1e-14 and r["quant_diff"] == 0.0, r
        assert r["local_scale_diff"] > 1e-3, r  # the shard's own mean is another number
    f = res["fsdp"]
    assert f["sharded"] and f["out_diff"] < 1e-12 and f["grad_diff"] < 1e-12, f
    i = res["init_from_fsdp"]
    assert i["sharded"] and i["loaded"] and i["max_diff"] == 0.0 and i["fresh_differs"], i


def _worker(outdir: str, parent: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from neotron.arch.quant import BitLinear
    from neotron.kernels.quant import absmean_scale, quantize_weight_ternary

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    res: dict = {}
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, generator=g)
    w[:3] *= 4  # rank 0's rows are louder: local means differ from the global one
    w[:, :4] *= 3
    for name, dim in (("rows", 0), ("cols", 1)):
        dt = distribute_tensor(w, mesh, [Shard(dim)])  # 5 or 7 over 2 ranks: uneven shards
        s = absmean_scale(dt)
        s_full = s.full_tensor() if isinstance(s, DTensor) else s
        q = quantize_weight_ternary(dt)
        res[name] = {
            "scale_diff": abs(s_full.item() - absmean_scale(w).item()),
            "quant_diff": (q.full_tensor() - quantize_weight_ternary(w)).abs().max().item(),
            "local_scale_diff": abs(absmean_scale(dt.to_local()).item() - absmean_scale(w).item()),
        }

    # FSDP2: each BitLinear's weight sharded by rows across the 2 ranks
    torch.manual_seed(1)
    ref = torch.nn.Sequential(BitLinear(32, 48), BitLinear(48, 16, input_norm=False)).double()
    with torch.no_grad():
        ref[0].weight[:24] *= 5  # make the rank-0 shard's absmean differ from the whole's
    model = torch.nn.Sequential(BitLinear(32, 48), BitLinear(48, 16, input_norm=False)).double()
    model.load_state_dict(ref.state_dict())
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    x = torch.randn(3, 4, 32, dtype=torch.float64, generator=g)  # the same batch on both ranks
    out, out_ref = model(x), ref(x)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    grad_diff = max((p.grad.full_tensor() - q.grad).abs().max().item()
                    for p, q in zip(model.parameters(), ref.parameters()))
    res["fsdp"] = {"sharded": sharded, "out_diff": (out - out_ref).abs().max().item(),
                   "grad_diff": grad_diff}
    # train.init_from into an FSDP2-sharded model (2 ranks): every shard gets the parent's values
    from neotron.arch import build_model, materialize
    from neotron.config import load
    from neotron.convert import find_checkpoint, load_model_tensors
    from neotron.train.init_from import init_from
    from neotron.train.parallel import parallelize, setup_env
    from tests.test_train_e2e import tiny

    args = tiny(Path(outdir) / "child", Path(outdir) / "unused-data", f"train.init_from={parent}")
    cfg = load(args[0], args[1:])
    env = setup_env(cfg)
    model = parallelize(materialize(build_model(cfg.model), "cpu", 0), env, cfg.train)
    want = load_model_tensors(find_checkpoint(parent)[0])
    fresh_differs = not torch.equal(model.state_dict()["embed.weight"].full_tensor(),
                                    want["embed.weight"])
    loaded = init_from(model, cfg, is_main=rank == 0)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    res["init_from_fsdp"] = {
        "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "loaded": loaded and set(full) == set(want),
        "max_diff": max((full[k] - want[k]).abs().max().item() for k in want),
        "fresh_differs": fresh_differs,
    }
    if rank == 0:
        (Path(outdir) / "rank0.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1], sys.argv[2])
