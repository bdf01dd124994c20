"""`neotron convert SOURCE OUT --export-ternary`: a BitNet checkpoint with its ternary weights
packed at 2 bits per weight.

    OUT/model.ternary.safetensors
        <name>.weight.tern2   uint8 [ceil(numel / 4)]: codes c in {-1, 0, +1} stored as c + 1
                              in 2 bits, four per byte, little end first (byte = u0 | u1 << 2 |
                              u2 << 4 | u3 << 6), row-major over the weight [out, in]
        <name>.weight.scale   fp32 [1]: the absmean scale s, so that W_q = c * s
        every other tensor    as saved (embeddings, norms, the LM head: fp32)
        metadata              format "neotron-ternary-v1", the packed weights' shapes (JSON)
    OUT/config.yaml           the run's config (the model to build around the tensors)
    OUT/neotron.json          sizes: the file on disk vs all tensors in bf16, and the ratio

`load_ternary(OUT)` rebuilds the model with the unpacked weights W_q = c * s, marked
`prequantized` so that BitLinear uses them as they are: its logits are those of the quantized
model the checkpoint holds (at lam = 1), bit for bit. The codes are those of the layer's own
forward (neotron.kernels.quant.ternary_codes on the fp32 weight and its absmean).

Tensors are read only through neotron.convert.load_model_tensors (the allow-listed DCP reader)
and written and read with safetensors (no pickle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from neotron.errors import UsageError

FORMAT = "neotron-ternary-v1"
FILE = "model.ternary.safetensors"


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1} codes (any shape) -> uint8 [ceil(numel / 4)], four 2-bit codes per byte."""
    u = (codes.flatten().to(torch.int16) + 1).to(torch.uint8)
    if (u > 2).any():
        raise ValueError("pack_ternary: codes must be -1, 0 or +1")
    u = torch.nn.functional.pad(u, (0, -u.numel() % 4), value=1).view(-1, 4)  # pad: code 0
    return u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 [ceil(numel / 4)] -> int8 codes of `shape`."""
    numel = 1
    for d in shape:
        numel *= d
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 4):
        raise UsageError(f"packed ternary tensor does not hold {numel} codes for shape {shape}")
    u = torch.stack([(packed >> k) & 3 for k in (0, 2, 4, 6)], dim=1).flatten()[:numel]
    if (u > 2).any():
        raise UsageError("packed ternary tensor holds an invalid 2-bit code (3)")
    return (u.to(torch.int8) - 1).view(shape)


def _ternary_weight_names(cfg) -> list[str]:
    from neotron.arch import build_model
    from neotron.arch.quant.bitlinear import BitLinear

    model = build_model(cfg.model)  # meta device: names only
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BitLinear)]


def export_ternary(source: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    from neotron.config import load
    from neotron.convert import find_checkpoint, load_model_tensors
    from neotron.kernels.quant import absmean_scale, ternary_codes

    ckpt, run_dir = find_checkpoint(source)
    config = run_dir / "config.yaml" if run_dir is not None else None
    if config is None or not config.is_file():
        raise UsageError(f"--export-ternary needs the run's config.yaml next to {ckpt}'s"
                         " checkpoints/ folder (to know which projections are BitLinear)")
    cfg = load(config)
    names = _ternary_weight_names(cfg)
    if not names:
        raise UsageError(f"{ckpt}: the model has no bitnet projections (model.linear.type is"
                         f" '{cfg.model.linear.type}'); nothing to pack")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty (--force overwrites)")
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_model_tensors(ckpt)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UsageError(f"{ckpt} lacks BitLinear weights of its own config: {missing[:3]}")
    packed: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    ternary_params = 0
    for name, t in tensors.items():
        if name in names:
            w = t.float()
            scale = absmean_scale(w)
            packed[f"{name}.tern2"] = pack_ternary(ternary_codes(w, scale))
            packed[f"{name}.scale"] = scale.reshape(1).float()
            shapes[name] = list(t.shape)
            ternary_params += t.numel()
        else:
            packed[name] = t.contiguous()
    path = out / FILE
    save_file(packed, str(path), metadata={"format": FORMAT, "shapes": json.dumps(shapes),
                                           "source": str(ckpt.resolve())})
    shutil.copyfile(config, out / "config.yaml")
    params = sum(t.numel() for t in tensors.values())
    packed_ternary_bytes = sum(packed[f"{n}.tern2"].numel() + 4 for n in names)
    size = path.stat().st_size
    info = {
        "source": str(ckpt.resolve()),
        "out": str(path),
        "params": params,
        "ternary_params": ternary_params,
        "ternary_tensors": len(names),
        "bytes": size,
        "bf16_bytes": 2 * params,  # every tensor in bf16, no header: the comparison's baseline
        "ratio_vs_bf16": size / (2 * params),
        # the packed projections alone: 2 bits + one fp32 scale each, vs 16 bits
        "ternary_ratio_vs_bf16": packed_ternary_bytes / (2 * ternary_params),
    }
    (out / "neotron.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_ternary(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of an --export-ternary directory, with the packed weights unpacked to c * s
    (marked prequantized) and every other tensor as exported; in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from neotron.arch import build_model, materialize
    from neotron.arch.quant.bitlinear import BitLinear
    from neotron.config import load

    path = Path(path)
    file = path / FILE
    if not file.is_file():
        raise UsageError(f"{file} not found (write it with neotron convert --export-ternary)")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise UsageError(f"{file}: not a {FORMAT} file (format {meta.get('format')!r})")
    shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
    tensors = load_file(str(file))
    cfg = load(path / "config.yaml")
    model = materialize(build_model(cfg.model), device, cfg.train.seed)
    state = {k: v for k, v in tensors.items() if not k.endswith((".tern2", ".scale"))}
    for name, shape in shapes.items():
        codes = unpack_ternary(tensors[f"{name}.tern2"], shape)
        state[name] = codes.float() * tensors[f"{name}.scale"].float()[0]
    model.load_state_dict(state, strict=True)
    for n, m in model.named_modules():
        if isinstance(m, BitLinear):
            if f"{n}.weight" not in shapes:
                raise UsageError(f"{file}: BitLinear {n} has no packed weight")
            m.prequantized = True
    return model.eval()
