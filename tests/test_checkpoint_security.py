"""Crafted checkpoints never run code, on any load path.

A real run's checkpoint is altered the way an attacker would: a hand-written `.metadata`
pickle whose global is a dotted name resolving to `os.system`, and checkpoints written with
torch's own `dcp.save` holding a pickled object (in the optimizer's param_groups, where DCP
itself would put non-tensor state, and in place of a model tensor). Each payload would create
a marker file. Every load path (resume, eval, convert, grow, train.init_from) must refuse each one with one
line and exit status 2, the marker must not exist, and the run directory must be unchanged.

Positive controls show that the payloads are live: torch's own readers execute them.
"""

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from neotron.cli import main
from tests.test_train_e2e import tiny

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("fresh_logging")]


def _system_via(module: str, name: str, command: str) -> bytes:
    """A protocol-4 pickle calling `module`:`name`(command), written opcode by opcode."""
    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + struct.pack("<B", len(b)) + b  # SHORT_BINUNICODE

    return (b"\x80\x04" + text(module) + text(name) + b"\x93"  # STACK_GLOBAL
            + text(command) + b"\x85" + b"R" + b".")  # TUPLE1, REDUCE, STOP


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(trained_run) -> Path:
    return trained_run


def _latest(run: Path) -> Path:
    ckpts = run / "checkpoints"
    return ckpts / (ckpts / "latest").read_text().strip()


def _resave_with(ckpt: Path, edit) -> None:
    """Rewrite `ckpt` with torch's own dcp.save: all its tensors, then `edit(flat_state)`."""
    md = FileSystemReader(ckpt).read_metadata()  # our own, trusted checkpoint
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    edit(state)
    out = ckpt.with_name(ckpt.name + ".new")
    dcp.save(state, checkpoint_id=out, no_dist=True)
    for keep in ("meta.json", "state.json"):
        shutil.copy(ckpt / keep, out / keep)
    shutil.rmtree(ckpt)
    out.rename(ckpt)


def craft_dotted_metadata(ckpt: Path, marker: Path) -> None:
    payload = _system_via("torch.distributed.checkpoint.filesystem", "os.system",
                          f"touch {marker}")
    (ckpt / ".metadata").write_bytes(payload)


def craft_pickled_param_group(ckpt: Path, marker: Path) -> None:
    _resave_with(ckpt, lambda s: s.update({"optim.param_groups.0.lr": _Payload(marker)}))


def craft_pickled_model_entry(ckpt: Path, marker: Path) -> None:
    _resave_with(ckpt, lambda s: s.update({"model.embed.weight": _Payload(marker)}))


ATTACKS = {
    "dotted_metadata_global": craft_dotted_metadata,
    "pickled_param_group": craft_pickled_param_group,
    "pickled_model_entry": craft_pickled_model_entry,
}


def _argv(path: str, run: Path, data_dir: Path, tmp: Path) -> list[str]:
    common = tiny(run, data_dir, "train.steps=6", "eval.every=0", "eval.at_start=false")
    if path == "resume":
        return ["train", *common]
    if path == "eval":
        return ["eval", *common]
    if path == "convert":
        return ["convert", str(run), str(tmp / "exported")]
    if path == "grow":
        target = tiny(tmp / "grown", data_dir, "train.steps=6")
        return ["grow", str(run), "--to", *target]
    if path == "init_from":
        return ["train", *tiny(tmp / "grown", data_dir, "train.steps=6",
                               f"train.init_from={run}")]
    raise AssertionError(path)


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("path", ["resume", "eval", "convert", "grow", "init_from"])
def test_crafted_checkpoint_is_refused(attack, path, trained, tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "PWNED"
    ATTACKS[attack](_latest(run), marker)
    before = _tree_hash(run)
    capsys.readouterr()

    status = main(_argv(path, run, data_dir, tmp_path))

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and "refusing" in lines[0], err
    assert "Traceback" not in err
    assert not marker.exists(), "the payload ran"
    assert _tree_hash(run) == before, "the run directory changed"
    assert not (tmp_path / "exported").exists() and not (tmp_path / "grown").exists()


def test_payloads_are_live_in_torch_own_readers(trained, tmp_path):
    """Positive controls: without neotron's reader, each crafted checkpoint runs its payload."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "PWNED"
    ckpt = _latest(run)
    craft_pickled_param_group(ckpt, marker)
    state = {"optim.param_groups.0.lr": 0.0}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)  # DCP's default planner unpickles it
    assert marker.exists()
    marker.unlink()
    craft_dotted_metadata(ckpt, marker)
    with open(ckpt / ".metadata", "rb") as f:
        pickle.load(f)  # what FileSystemReader.read_metadata does
    assert marker.exists()


@pytest.mark.parametrize("module,name", [
    ("os", "system"),
    ("builtins", "eval"),
    ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
    ("torch", "load"),
    ("torch", "Size.__new__"),
    ("subprocess", "Popen"),
])
def test_metadata_allow_list_is_exact(module, name, tmp_path):
    from neotron.train.safe_reader import CheckpointError, read_metadata_file

    marker = tmp_path / "PWNED"
    path = tmp_path / ".metadata"
    path.write_bytes(_system_via(module, name, f"touch {marker}"))
    with pytest.raises(CheckpointError, match="refusing"):
        read_metadata_file(path)
    assert not marker.exists()


def test_state_json_cannot_add_entries(trained, tmp_path):
    """The JSON beside a checkpoint only overrides plain values the live optimizer has."""
    from neotron.config import load
    from neotron.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = _latest(run)
    doc = json.loads((ckpt / "state.json").read_text())
    lr_entry = next(e for e in doc["leaves"] if e[0][-1] == "lr")
    lr_entry[1] = 0.123
    doc["leaves"].append([["optim", "param_groups", 0, "injected"], "x"])
    (ckpt / "state.json").write_text(json.dumps(doc))

    from neotron.arch import build_model, materialize
    from neotron.optim.builder import build_optimizer

    cfg = load(run / "config.yaml")
    model = materialize(build_model(cfg.model), "cpu", 0)
    opt = build_optimizer(model, cfg.optim)
    Checkpointer(run / "checkpoints", 2, is_writer=False).load(ckpt, model, opt)
    group = opt.param_groups[lr_entry[0][2]]
    assert group["lr"] == 0.123
    assert all("injected" not in g for g in opt.param_groups)
