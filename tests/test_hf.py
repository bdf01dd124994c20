"""Hugging Face export, import and `neotron.load_model`.

Compared:
- a pure-Llama neotron model exported with `--format hf` against transformers' own
  `LlamaForCausalLM` (an independent implementation: its attention, RoPE, RMSNorm, SwiGLU),
  loaded with no remote code: logits within 1e-5 in fp32, with a non-default RoPE theta and
  norm eps, tied and untied; the tokenizer through `AutoTokenizer`;
- the DeltaNet, hybrid, memory and TokenFormer architectures through the Auto classes with
  `trust_remote_code=True` (the shim in the export; once in a fresh process that has not
  imported neotron): logits equal to neotron's own forward, and `generate` equal to a greedy
  loop written here over neotron's forward, also for a left-padded batch;
- a `LlamaForCausalLM` built here from a config -> `--from-hf` -> `--format hf`: bitwise
  equal state dicts and the same config; the import's logits against transformers', and
  `train.init_from` starting from it;
- sharded saves, and bad input as one-line errors (exit 2).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neotron.errors import UsageError

# in-process `neotron.cli.main` calls need fresh logging handlers (conftest)
pytestmark = pytest.mark.usefixtures("fresh_logging")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind"


def _main(*argv: str) -> int:
    """`neotron ...` in-process (the module's tests run with conftest's `fresh_logging`)."""
    from neotron.cli import main

    return main([str(a) for a in argv])


def _quick_run(run: Path, data_dir: Path, config: str, *overrides: str) -> Path:
    """A run directory with one checkpoint of a freshly initialized model, perturbed so that
    norms and small weights are far from their init (no training: milliseconds)."""
    from neotron.arch.model import build_model, materialize
    from neotron.config import load, to_yaml
    from neotron.train.checkpoint import Checkpointer

    cfg = load(DEMO / config, [f"run_dir={run}", f"data.dir={data_dir}",
                               "data.tokenizer.vocab_size=512", "model.vocab_size=512",
                               "data.seq_len=32", "model.max_seq_len=64", "model.dim=32",
                               *overrides])
    model = materialize(build_model(cfg.model), "cpu", seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(run / "checkpoints", keep_last=1).save(1, model, optimizer, {"tokens": 0})
    return run


def _neotron_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    import neotron

    model = neotron.load_model(path)
    with torch.no_grad():
        return model(tokens)


def _greedy(model, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by hand: the argmax of a full forward, one token at a time."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def _prompt(path) -> torch.Tensor:
    import neotron

    tok = neotron.load_model(path).tokenizer
    return torch.tensor([tok.encode(TEXT)[:20]])


# ------------------------------------------------------------------ Llama, no remote code


@pytest.fixture(scope="module")
def llama_hf(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama_hf") / "hf"
    assert _main("convert", trained_run, out, "--format", "hf") == 0
    return out


def test_demo_llama_exports_as_plain_llama(trained_run, llama_hf):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    config = json.loads((llama_hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not (llama_hf / "modeling_neotron.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(llama_hf)
    assert type(hf) is LlamaForCausalLM and not hf.training
    tokens = _prompt(trained_run)
    with torch.no_grad():
        theirs = hf(tokens).logits
    ours = _neotron_logits(trained_run, tokens)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(_neotron_logits(llama_hf, tokens), ours, rtol=0, atol=0)
    # tied: one embedding matrix, no lm_head stored
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(llama_hf / "model.safetensors"))
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_tokenizer_round_trips(trained_run, llama_hf):
    from transformers import AutoTokenizer

    import neotron

    tok = AutoTokenizer.from_pretrained(llama_hf)
    ours = neotron.load_model(trained_run).tokenizer
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert ids == ours.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", ours.eos_id)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((llama_hf / name).read_text())["eos_token"] == "<|endoftext|>", name
    gen = json.loads((llama_hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eos_id


@pytest.mark.parametrize("tied", [True, False])
def test_llama_carries_theta_eps_and_tying_exactly(data_dir, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from neotron.hf.export import export_hf

    run = _quick_run(tmp_path / "run", data_dir, "llama.yaml", "model.n_layers=2",
                     "model.norm_eps=3.0e-6", f"model.tie_embeddings={str(tied).lower()}",
                     "model.blocks.attention.mixer.rope_theta=12345.5",
                     "model.blocks.attention.mixer.n_heads=4",
                     "model.blocks.attention.mixer.n_kv_heads=2")
    info = export_hf(run, tmp_path / "hf")
    assert info["architecture"] == "LlamaForCausalLM" and info["why_not_llama"] == []
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.rms_norm_eps == 3.0e-6
    assert hf.config.rope_parameters["rope_theta"] == 12345.5
    assert hf.config.tie_word_embeddings is tied
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, _neotron_logits(run, tokens), rtol=0, atol=1e-5)


def test_non_llama_fields_fall_back_with_reasons():
    from neotron.config import load
    from neotron.hf.llama import llama_mismatches

    def why(*overrides):
        return llama_mismatches(load(DEMO / "llama.yaml", list(overrides)).model)

    assert why() == []
    assert why("model.blocks.attention.mixer.qk_norm=true") == \
        ["model.blocks.attention.mixer.qk_norm"]
    assert why("model.linear.type=bitnet") == ["model.linear.type=bitnet"]
    assert why("model.recursion.loops=2") == ["model.recursion (shared, looped blocks)"]
    assert any("dim not divisible" in w for w in
               why("model.blocks.attention.mixer.n_heads=5", "model.blocks.attention.mixer.n_kv_heads=1",
                   "model.blocks.attention.mixer.head_dim=32"))
    assert llama_mismatches(load(DEMO / "hybrid.yaml").model) == \
        ["model.blocks.deltanet.mixer.type=deltanet"]
    assert llama_mismatches(load(DEMO / "memory.yaml").model) == \
        ["model.blocks.memory.ffn.type=memory"]


# ------------------------------------------------------- neotron architectures, remote code

ARCHS = {
    "deltanet": ("deltanet.yaml", "model.n_layers=2", "model.blocks.deltanet.mixer.n_heads=2"),
    "hybrid": ("hybrid.yaml", "model.blocks.deltanet.mixer.n_heads=2",
               "model.blocks.attention.mixer.n_heads=2", "model.blocks.attention.mixer.n_kv_heads=1"),
    "memory": ("memory.yaml", "model.blocks.attention.mixer.n_heads=2",
               "model.blocks.attention.mixer.n_kv_heads=1", "model.blocks.memory.mixer.n_heads=2",
               "model.blocks.memory.mixer.n_kv_heads=1", "model.blocks.memory.ffn.n_keys=8",
               "model.blocks.memory.ffn.k_dim=16", "model.blocks.memory.ffn.heads=2",
               "model.blocks.memory.ffn.knn=4"),
    "tokenformer": ("tokenformer.yaml", "model.n_layers=2", "model.linear.n_tokens=24",
                    "model.blocks.tokenformer.mixer.n_heads=2",
                    "model.blocks.tokenformer.ffn.n_tokens=48"),
    # a non-persistent buffer (the slot permutation): transformers leaves it empty, and
    # NeotronForCausalLM._init_weights must recompute it without touching the loaded weights
    "ultramem": ("ultramem.yaml", "model.n_layers=2", "model.blocks.ultramem.mixer.n_heads=2",
                 "model.blocks.ultramem.mixer.n_kv_heads=1", "model.blocks.ultramem.ffn.n_keys=8",
                 "model.blocks.ultramem.ffn.knn=4", "model.blocks.ultramem.ffn.k_dim=16",
                 "model.blocks.ultramem.ffn.v_dim=16", "model.blocks.ultramem.ffn.pre_dim=16",
                 "model.blocks.ultramem.ffn.parallel_ffn.hidden_dim=64"),
}


@pytest.fixture(scope="module")
def arch_exports(data_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    from neotron.hf.export import export_hf

    root = tmp_path_factory.mktemp("archs")
    out = {}
    for name, (config, *overrides) in ARCHS.items():
        run = _quick_run(root / name, data_dir, config, *overrides)
        info = export_hf(run, root / f"{name}_hf")
        assert info["architecture"] == "NeotronForCausalLM" and info["why_not_llama"], name
        out[name] = (run, root / f"{name}_hf")
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_neotron_arch_loads_through_auto_classes(arch_exports, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, hf_dir = arch_exports[arch]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_neotron.NeotronForCausalLM"
    shim = ast.parse((hf_dir / "modeling_neotron.py").read_text()).body
    code = [s for s in shim[1:] if not isinstance(s, ast.Assign)]  # docstring, __all__ aside
    assert all(isinstance(s, ast.ImportFrom) and s.module == "neotron.hf.modeling"
               for s in code), "the shim must only import neotron's classes"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    assert type(model).__name__ == "NeotronForCausalLM" and not model.training
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    tokens = tok(TEXT, return_tensors="pt").input_ids[:, :20]
    import neotron

    ours = neotron.load_model(run)
    with torch.no_grad():
        theirs = model(tokens).logits
        torch.testing.assert_close(theirs, ours(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(neotron.load_model(hf_dir)(tokens), ours(tokens), rtol=0,
                                   atol=0)
        # labels: transformers' shifted next-token loss, here by hand
        loss = model(tokens, labels=tokens).loss
        ref = torch.nn.functional.cross_entropy(ours(tokens)[0, :-1], tokens[0, 1:])
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    generated = model.generate(tokens, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, _greedy(ours, tokens, 4))


def test_generate_left_padded_batch_matches_each_prompt(arch_exports):
    """Padding is its own document: no attention to it, no recurrent state through it."""
    from transformers import AutoModelForCausalLM

    import neotron

    run, hf_dir = arch_exports["hybrid"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    ours = neotron.load_model(run)
    a = torch.tensor([[5, 17, 99, 230, 41, 8, 77]])
    b = torch.tensor([[300, 12, 61]])
    pad = model.generation_config.pad_token_id
    batch = torch.cat([a, torch.cat([torch.full((1, 4), pad), b], dim=1)])
    mask = (torch.arange(7) >= torch.tensor([[0], [4]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[0], _greedy(ours, a, 3)[0])
    assert torch.equal(out[1, 4:], _greedy(ours, b, 3)[0])


def test_fresh_process_loads_through_the_shim(arch_exports, tmp_path):
    """As a user would: nothing of neotron imported before from_pretrained."""
    run, hf_dir = arch_exports["deltanet"]
    tokens = [[5, 17, 99, 230, 41]]
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, trust_remote_code=True)\n"
        "assert 'neotron.hf.modeling' in sys.modules\n"
        "shim = [k for k in sys.modules if k.endswith('modeling_neotron')]\n"
        f"x = torch.tensor({tokens})\n"
        "with torch.no_grad(): y = m(x).logits\n"
        f"m.save_pretrained({str(tmp_path / 'resaved')!r})\n"
        "print(json.dumps({'shim': shim, 'logits': y.flatten().tolist()}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shim"], "the export's modeling_neotron.py was not used"
    theirs = torch.tensor(result["logits"]).view(1, 5, -1)
    torch.testing.assert_close(theirs, _neotron_logits(run, torch.tensor(tokens)),
                               rtol=0, atol=1e-5)
    # save_pretrained keeps the export's layout: the shim, not a copy of neotron's module
    resaved = tmp_path / "resaved"
    assert (resaved / "modeling_neotron.py").read_text() == \
        (hf_dir / "modeling_neotron.py").read_text()
    assert not (resaved / "modeling.py").exists()
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == \
        json.loads((hf_dir / "config.json").read_text())["auto_map"]
    torch.testing.assert_close(_neotron_logits(resaved, torch.tensor(tokens)), theirs,
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------------ import from HF


def _hf_llama(out: Path, data_dir: Path, *, tied: bool, **extra) -> Path:
    """A random LlamaForCausalLM, built by transformers from a config, saved with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neotron.hf.files import write_tokenizer

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, rms_norm_eps=2e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                      tie_word_embeddings=tied, initializer_range=0.1, eos_token_id=0,
                      bos_token_id=None, **extra)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    write_tokenizer(data_dir / "tokenizer.json", "<|endoftext|>", out, 64)
    return out


@pytest.mark.parametrize("tied,extra", [(True, {}),
                                         (False, {"head_dim": 24, "attention_bias": True})])
def test_hf_to_neotron_to_hf_is_exact(data_dir, tmp_path, tied, extra):
    from transformers import AutoModelForCausalLM

    from neotron.hf.files import read_weights

    src = _hf_llama(tmp_path / "src", data_dir, tied=tied, **extra)
    assert _main("convert", "--from-hf", src, tmp_path / "run") == 0
    assert _main("convert", tmp_path / "run", tmp_path / "back", "--format", "hf") == 0
    before, after = read_weights(src), read_weights(tmp_path / "back")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    c0 = json.loads((src / "config.json").read_text())
    c1 = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_parameters", "tie_word_embeddings", "max_position_embeddings",
                "attention_bias", "hidden_act", "eos_token_id"):
        assert c0[key] == c1[key], key
    hf = AutoModelForCausalLM.from_pretrained(src)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(_neotron_logits(tmp_path / "run", tokens), theirs,
                               rtol=0, atol=1e-5)


def test_init_from_starts_from_an_imported_llama(data_dir, tmp_path):
    from neotron.config import load
    from neotron.hf.files import read_weights
    from neotron.hf.llama import from_llama_names
    from neotron.train.trainer import Trainer
    from tests.test_train_e2e import tiny

    src = _hf_llama(tmp_path / "src", data_dir, tied=True)
    assert _main("convert", "--from-hf", src, tmp_path / "imported") == 0
    args = tiny(tmp_path / "child", data_dir, f"train.init_from={tmp_path / 'imported'}")
    t = Trainer(load(args[0], args[1:]))
    try:
        state = t.model.state_dict()
        expected = from_llama_names(read_weights(src), tied=True)
        assert state.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(state[k], v), k
        assert (t.step, t.tokens) == (0, 0)
    finally:
        t.metrics.close()
        t.stop.uninstall()


# ------------------------------------------------------------------ sharding, errors


def test_sharded_export_loads(trained_run, llama_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    import neotron

    out = tmp_path / "sharded"
    assert _main("convert", trained_run, out, "--format", "hf", "--max-shard-size", "40KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert all((out / s).stat().st_size < 40_000 + 4096 or
               len([k for k, v in index["weight_map"].items() if v == s]) == 1 for s in shards)
    tokens = _prompt(trained_run)
    with torch.no_grad():
        sharded = AutoModelForCausalLM.from_pretrained(out)(tokens).logits
        whole = AutoModelForCausalLM.from_pretrained(llama_hf)(tokens).logits
    assert torch.equal(sharded, whole)
    torch.testing.assert_close(_neotron_logits(out, tokens), whole, rtol=0, atol=1e-5)
    assert neotron.load_model(out).tokenizer is not None


def _one_line_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert _main(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neotron: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line(trained_run, llama_hf, data_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16,
                               n_positions=16)).save_pretrained(gpt2)
    err = _one_line_error(capsys, "convert", "--from-hf", gpt2, tmp_path / "x")
    assert "model_type 'llama'" in err and "'gpt2'" in err
    assert not (tmp_path / "x").exists()

    err = _one_line_error(capsys, "convert", trained_run, llama_hf, "--format", "hf")
    assert "exists and is not empty (--force overwrites)" in err
    err = _one_line_error(capsys, "convert", "--from-hf", _hf_llama(tmp_path / "l", data_dir,
                                                                    tied=True), llama_hf)
    assert "--force" in err

    scaled = tmp_path / "scaled"
    scaled.mkdir()
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 10000.0}
                ).to_json_file(str(scaled / "config.json"))
    err = _one_line_error(capsys, "convert", "--from-hf", scaled, tmp_path / "y")
    assert "rope scaling 'linear'" in err

    pickled = tmp_path / "pickled"
    _hf_llama(pickled, data_dir, tied=True)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    err = _one_line_error(capsys, "convert", "--from-hf", pickled, tmp_path / "z")
    assert "pytorch_model.bin" in err

    err = _one_line_error(capsys, "convert", trained_run, tmp_path / "w", "--format", "hf",
                          "--max-shard-size", "lots")
    assert "--max-shard-size" in err
    with pytest.raises(UsageError, match="does not exist"):
        import neotron

        neotron.load_model(tmp_path / "nowhere")


def test_load_model_reads_every_kind_of_path(trained_run, llama_hf, tmp_path):
    import neotron
    from neotron.convert import convert

    convert(trained_run, tmp_path / "plain")
    latest = (trained_run / "checkpoints" / "latest").read_text().strip()
    tokens = _prompt(trained_run)
    ref = _neotron_logits(trained_run, tokens)
    for path in (trained_run / "checkpoints" / latest, tmp_path / "plain", llama_hf):
        model = neotron.load_model(path)
        assert not model.training and model.cfg.dim == 32
        assert model.tokenizer is not None and model.tokenizer.eos_id is not None
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), ref, rtol=0, atol=1e-5)
    assert neotron.load_model(trained_run).run_config.run_dir == str(trained_run)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # crafting, in one process
@pytest.mark.parametrize("path", ["export", "load_model"])
@pytest.mark.parametrize("attack", ["dotted_metadata_global", "pickled_model_entry"])
def test_crafted_checkpoint_is_refused(trained_run, tmp_path, capsys, attack, path):
    """The new load paths read checkpoints through the same allow-listed reader."""
    import shutil

    import neotron
    from neotron.train.safe_reader import CheckpointError
    from tests.test_checkpoint_security import ATTACKS, _latest

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "PWNED"
    ATTACKS[attack](_latest(run), marker)
    if path == "export":
        err = _one_line_error(capsys, "convert", run, tmp_path / "hf", "--format", "hf")
        assert "refusing" in err and not (tmp_path / "hf").exists()
    else:
        with pytest.raises(CheckpointError, match="refusing"):
            neotron.load_model(run)
    assert not marker.exists(), "the payload ran"
