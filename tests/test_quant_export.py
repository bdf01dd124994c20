"""Ternary export: `neotron convert --export-ternary` packs a BitNet checkpoint's BitLinear
weights at 2 bits per weight plus one scale each; the packed file, loaded back, gives the
quantized model's logits bit for bit. Compared: the logits of the checkpoint's model (built
from its config, weights read with load_model_tensors, lam = 1) and of `load_ternary(OUT)`;
the packing round trip and its bit layout against codes written here by hand; the sizes.
"""

from __future__ import annotations

import json

import pytest
import torch

from neotron.arch.quant.export import load_ternary, pack_ternary, unpack_ternary
from tests.test_train_e2e import tiny


def test_pack_layout_and_round_trip():
    codes = torch.tensor([-1, 0, 1, 1, 0, -1], dtype=torch.int8)
    packed = pack_ternary(codes)
    # stored value c + 1, four per byte, first code in the lowest two bits; the pad is code 0
    assert packed.tolist() == [0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 0 << 2 | 1 << 4 | 1 << 6]
    assert torch.equal(unpack_ternary(packed, (2, 3)), codes.view(2, 3))
    big = torch.randint(-1, 2, (7, 13), dtype=torch.int8)
    assert torch.equal(unpack_ternary(pack_ternary(big), (7, 13)), big)
    with pytest.raises(Exception, match="does not hold"):
        unpack_ternary(pack_ternary(big), (7, 14))


def test_export_round_trip_reproduces_the_quantized_logits(data_dir, tmp_path, capsys):
    from neotron.arch import build_model, materialize
    from neotron.arch.quant import BitLinear
    from neotron.cli import main
    from neotron.config import load
    from neotron.convert import find_checkpoint, load_model_tensors

    run = tmp_path / "run"
    args = tiny(run, data_dir, "model.linear.type=bitnet", "train.steps=3", "eval.every=0",
                "eval.at_start=false", "checkpoint.every=3")
    assert main(["train", *args]) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["convert", str(run), str(out), "--export-ternary"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["ternary_tensors"] == 2 * 7  # wq wk wv wo w1 w3 w2 in each of 2 layers
    assert info["bytes"] == (out / "model.ternary.safetensors").stat().st_size
    assert info["ternary_ratio_vs_bf16"] < 0.13  # 2 bits of 16, plus scales and padding

    cfg = load(run / "config.yaml")
    model = materialize(build_model(cfg.model), "cpu", 0)
    ckpt, _ = find_checkpoint(run)
    model.load_state_dict(load_model_tensors(ckpt))
    model.eval()
    loaded = load_ternary(out)
    assert all(m.prequantized for m in loaded.modules() if isinstance(m, BitLinear))
    x = torch.randint(0, 512, (3, 32))
    with torch.no_grad():
        want, got = model(x), loaded(x)
    assert torch.equal(want, got)
    # the packed weights really are ternary: at most 3 distinct values per projection
    w = loaded.layers[0].mixer.wq.weight
    assert len(w.unique()) <= 3

    # not a bitnet run: a usage error, exit 2
    dense = tmp_path / "dense"
    assert main(["train", *tiny(dense, data_dir, "train.steps=1", "eval.every=0",
                                "eval.at_start=false")]) == 0
    capsys.readouterr()
    assert main(["convert", str(dense), str(tmp_path / "e2"), "--export-ternary"]) == 2
    assert "no bitnet projections" in capsys.readouterr().err
