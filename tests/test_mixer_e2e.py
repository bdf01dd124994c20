"""`neotron train` end to end on the hybrid demo config (DeltaNet + attention, document
masking on): a tiny model for a few steps in a real process, as a user would run it."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.slow
def test_hybrid_demo_trains_end_to_end(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = [
        str(ROOT / "configs/demo/hybrid.yaml"), f"run_dir={run_dir}", f"data.dir={data_dir}",
        "data.tokenizer.vocab_size=512", "data.seq_len=32", "model.vocab_size=512",
        "model.dim=32", "model.blocks.deltanet.mixer.n_heads=2",
        "model.blocks.attention.mixer.n_heads=2", "model.blocks.attention.mixer.n_kv_heads=1",
        "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.steps=8",
        "optim.schedule.warmup_steps=2", "eval.every=8", "eval.batches=2", "eval.batch_size=4",
        "checkpoint.every=0", "log.every=1",
    ]
    proc = run_cli("train", *args, check=True)
    assert "0.08M parameters" in proc.stdout  # the hybrid model was built (4 layers, dim 32)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert all(r["mfu"] is None or r["mfu"] > 0 for r in recs if "loss" in r)
    assert len(vals) == 2 and vals[-1] < vals[0]  # step 0 and step 8
    saved = (run_dir / "config.yaml").read_text()
    assert "document_masking: true" in saved and "type: deltanet" in saved
