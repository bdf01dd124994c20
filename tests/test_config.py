"""Config loading: inheritance, overrides, and one clear message (exit 2) per mistake."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from neotron.cli import main
from neotron.config import ConfigError, apply_override, load

MINIMAL = {
    "run_dir": "runs/x",
    "model": {"vocab_size": 512, "dim": 64, "n_layers": 2,
              "blocks": {"attention": {"mixer": {"type": "attention", "n_heads": 4}}}},
    "data": {"tokenizer": {"vocab_size": 300}, "seq_len": 32},
    "train": {"steps": 10, "global_batch_tokens": 256, "micro_batch_size": 4},
    "optim": {"schedule": {"warmup_steps": 2}},
}


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load(write(tmp_path, MINIMAL))
    assert cfg.model.dim == 64
    assert cfg.model.layer_blocks() == ["attention", "attention"]
    assert cfg.global_batch_size == 8
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.steps = 3


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, {**MINIMAL, "log": {"every": 7, "tensorboard": False}}, "base.yaml")
    child = {"base": "../base.yaml", "log": {"every": 3},
             "model": {"blocks": {"attention": {"mixer": {"type": "attention", "n_heads": 2}}}}}
    cfg = load(write(tmp_path / "sub", child))
    assert cfg.log.every == 3 and cfg.log.tensorboard is False  # merged
    assert cfg.model.dim == 64 and cfg.model.blocks["attention"].mixer.n_heads == 2


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, {"base": "b.yaml"}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load(tmp_path / "a.yaml")


def test_overrides_are_yaml_scalars(tmp_path):
    cfg = load(write(tmp_path, MINIMAL), ["train.steps=20", "optim.lr=1e-3",
                                          "log.tensorboard=false", "model.pattern=[attention]"])
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3 and cfg.log.tensorboard is False
    assert cfg.model.pattern == ["attention"]


def test_override_into_list_and_bad_override():
    data = {"a": {"b": [1, 2, 3]}}
    apply_override(data, "a.b.1=9")
    assert data["a"]["b"] == [1, 9, 3]
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override(data, "a.b")
    with pytest.raises(ConfigError, match="indexes a list"):
        apply_override(data, "a.b.7=1")


# ------------------------------------------------------------------ error classes via the CLI

ERRORS = {
    "unknown_key": (["model.blocks.attention.mixer.n_head=4"],
                    ["model.blocks.attention.mixer.n_head", "did you mean 'n_heads'"]),
    "unknown_top_level_key": (["trian.steps=3"], ["trian", "did you mean 'train'"]),
    "wrong_type": (["train.steps=many"], ["train.steps", "valid integer", "'many'"]),
    "bad_combination": (["model.dim=66"], ["model.blocks.attention.mixer.n_heads",
                                           "not divisible"]),
    "unknown_layer_type": (["model.blocks.attention.mixer.type=transformer"],
                           ["model.blocks.attention.mixer", "attention"]),
    "missing_data_path": (["data.source=files", "data.paths=[/nonexistent/corpus.txt]"],
                          ["data.paths", "/nonexistent/corpus.txt"]),
    "batch_not_divisible": (["train.global_batch_tokens=100"],
                            ["train.global_batch_tokens", "multiple"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_config_errors_exit_2_with_key_path(case, tmp_path, capsys):
    overrides, needles = ERRORS[case]
    code = main(["config", str(write(tmp_path, MINIMAL)), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert "Traceback" not in err


def test_missing_required_key_and_file(tmp_path, capsys):
    data = {k: v for k, v in MINIMAL.items() if k != "run_dir"}
    assert main(["config", str(write(tmp_path, data))]) == 2
    assert "run_dir: required key is missing" in capsys.readouterr().err
    assert main(["config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path, cli):
    proc = cli("train", str(write(tmp_path, MINIMAL)), "model.n_layer=3")
    assert proc.returncode == 2
    assert "model.n_layer" in proc.stderr and "did you mean 'n_layers'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_command_prints_resolved_config(tmp_path, capsys):
    assert main(["config", str(write(tmp_path, MINIMAL)), "train.steps=42"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 42
    assert printed["model"]["blocks"]["attention"]["ffn"]["type"] == "swiglu"  # defaults shown
    assert load(write(tmp_path, printed, "round.yaml")).train.steps == 42  # it round-trips


def test_every_shipped_config_validates():
    root = Path(__file__).resolve().parents[1] / "configs"
    # configs/studies/ holds study files, a schema of their own (validated in tests/test_study*.py)
    files = [p for p in root.rglob("*.yaml")
             if p.name != "base.yaml" and p.relative_to(root).parts[0] != "studies"]
    assert len(files) >= 7
    for path in files:
        load(path)
