"""Run observability beyond metrics.jsonl (docs/logging.md), checked by reading the files back
with readers that share nothing with neotron's writers:

- TensorBoard: the event file read by tensorboard's own EventAccumulator holds the resolved
  config as text (equal to run_dir/config.yaml) and an hparams session whose values are the
  config's leaves and whose metrics are scalars that end at metrics.jsonl's last values;
- log.profile: the Chrome trace is valid JSON, has a `neotron_step_<n>` range for exactly the
  profiled steps, and the model's matmuls inside them;
- log.wandb: the offline run file (`run-*.wandb`, decoded here from its record framing with
  wandb's protobuf schema) has, step by step, the same numbers as metrics.jsonl; without wandb
  installed a fake module in sys.modules takes the calls instead;
- only the writer rank touches wandb, and a missing wandb is a one-line config error.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import yaml

from tests.test_train_e2e import records, tiny

PROFILE_START, PROFILE_STEPS, STEPS = 2, 2, 6


class FakeWandb(types.ModuleType):
    """Stands in for `wandb`: records init kwargs and logged rows."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = ModuleSpec("wandb", None)
        self.inits: list[dict] = []
        self.rows: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, row, step):
                fake.rows.append((step, dict(row)))

            def finish(self):
                fake.finished += 1

        return Run()


def _have_wandb() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """One tiny run with TensorBoard, a profile window and W&B (offline, or the fake)."""
    import logging

    from neotron.cli import main

    run_dir = tmp_path_factory.mktemp("logging") / "run"
    args = tiny(run_dir, data_dir, f"train.steps={STEPS}", "eval.every=3", "checkpoint.every=0",
                f"log.profile.start={PROFILE_START}", f"log.profile.steps={PROFILE_STEPS}",
                "log.wandb.project=neotron-test", "log.wandb.mode=offline",
                "log.wandb.name=tiny", f"log.wandb.dir={run_dir.parent / 'wb'}")
    fake = None if _have_wandb() else FakeWandb()
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    if fake is not None:
        mp.setitem(sys.modules, "wandb", fake)
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        assert main(["train", *args]) == 0
    finally:
        root.handlers[:] = saved
        mp.undo()
    return run_dir, fake


# ---------------------------------------------------------------- TensorBoard


def _accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_tensorboard_has_config_text(run):
    run_dir, _ = run
    ea = _accumulator(run_dir)
    [event] = ea.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    shown = "".join(line[4:] + "\n" for line in text.splitlines())  # markdown code block
    assert shown == (run_dir / "config.yaml").read_text()


def test_tensorboard_has_hparams_of_the_config(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _ = run
    ea = _accumulator(run_dir)
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    leaves = _leaves(yaml.safe_load((run_dir / "config.yaml").read_text()))
    got = dict(start.hparams.items())
    assert set(got) == set(leaves)
    for key, value in leaves.items():
        hv = got[key]
        if isinstance(value, bool):
            assert hv.string_value == ("true" if value else "false"), key
        elif isinstance(value, (int, float)):
            assert hv.number_value == value, key
        elif isinstance(value, str):
            assert hv.string_value == value, key
        else:  # lists, None
            assert json.loads(hv.string_value) == value, key
    assert got["model.dim"].number_value == 32 and got["train.steps"].number_value == STEPS
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert metric_tags == {"loss", "val/loss", "val/ppl"}
    # The HParams tab shows each metric's last scalar: the run's final values.
    recs = records(run_dir)
    final = {"loss": [r["loss"] for r in recs if "loss" in r][-1],
             "val/loss": [r["val_loss"] for r in recs if "val_loss" in r][-1]}
    for tag, value in final.items():
        scalars = ea.Scalars(tag)
        assert scalars[-1].step == STEPS
        assert scalars[-1].value == pytest.approx(value, rel=1e-6)


# ---------------------------------------------------------------- profiler


def test_profile_trace_covers_exactly_the_window(run):
    run_dir, _ = run
    last = PROFILE_START + PROFILE_STEPS - 1
    [path] = (run_dir / "profile").iterdir()
    assert path.name == f"trace_rank0_steps{PROFILE_START}-{last}.json"
    trace = json.loads(path.read_text())
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = {e["name"]: e for e in events if e["name"].startswith("neotron_step_")}
    assert set(steps) == {f"neotron_step_{n}" for n in range(PROFILE_START, last + 1)}
    for step in steps.values():
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        inside = [e["name"] for e in events if t0 <= e["ts"] <= t1]
        # forward and backward of the model ran in the range
        assert any(n in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")
                   for n in inside)
        assert any("backward" in n.lower() for n in inside)


# ---------------------------------------------------------------- W&B


def _wandb_records(path: Path):
    """Records of a .wandb file: a 7-byte header (":W&B", magic, version), then the LevelDB
    log framing in 32 KiB blocks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            yield buf
            buf = b""


def _wandb_rows(run) -> tuple[dict[int, dict], dict]:
    """{step: {key: value}} as W&B stored it, and the run's config."""
    run_dir, fake = run
    rows: dict[int, dict] = {}
    if fake is not None:
        [init] = fake.inits
        for step, row in fake.rows:
            rows.setdefault(step, {}).update(row)
        assert fake.finished == 1
        return rows, init["config"]
    from wandb.proto import wandb_internal_pb2

    [path] = (run_dir.parent / "wb").glob("wandb/offline-run-*/run-*.wandb")
    config = {}
    for data in _wandb_records(path):
        rec = wandb_internal_pb2.Record.FromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or ".".join(i.nested_key): json.loads(i.value_json)
                   for i in rec.history.item}
            rows.setdefault(row["_step"], {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")})
        if kind in ("run", "config"):  # the config comes with the run record, updates later
            updates = rec.run.config.update if kind == "run" else rec.config.update
            for i in updates:
                key = i.key or ".".join(i.nested_key)
                if not key.startswith("_"):
                    config[key] = json.loads(i.value_json)
        if kind == "run":
            assert rec.run.project == "neotron-test" and rec.run.display_name == "tiny"
    return rows, config


def test_wandb_mirrors_metrics_jsonl(run):
    run_dir, _ = run
    rows, config = _wandb_rows(run)
    expected: dict[int, dict] = {}
    for r in records(run_dir):
        numbers = {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))
                   and math.isfinite(v)}
        expected.setdefault(r["step"], {}).update(numbers)
    assert sorted(rows) == sorted(expected) == list(range(STEPS + 1))
    for step, want in expected.items():
        assert set(rows[step]) == set(want), step
        for k, v in want.items():
            assert rows[step][k] == pytest.approx(v, rel=1e-12), (step, k)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: config[k] for k in saved} == saved


def test_wandb_only_on_writer_rank_and_missing_is_a_config_error(tmp_path, monkeypatch):
    from neotron.config import load
    from neotron.errors import ConfigError
    from neotron.train.metrics import MetricsLogger
    from tests.test_train_e2e import DEMO

    cfg = load(DEMO, [f"run_dir={tmp_path}", "log.wandb.project=p", "log.wandb.mode=offline"])
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    other = MetricsLogger(tmp_path / "r1", is_writer=False, tensorboard=False, resume_step=None,
                          total_steps=1, run_config=cfg)
    other.log({"step": 1, "loss": 1.0})
    other.close()
    assert fake.inits == [] and fake.rows == [] and not (tmp_path / "r1").exists()
    writer = MetricsLogger(tmp_path / "r0", is_writer=True, tensorboard=False, resume_step=None,
                           total_steps=1, run_config=cfg)
    writer.log({"step": 1, "loss": 2.0, "mfu": None, "lr": float("nan")})
    writer.close()
    assert [i["project"] for i in fake.inits] == ["p"] and fake.inits[0]["mode"] == "offline"
    assert fake.rows == [(1, {"loss": 2.0})] and fake.finished == 1
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails: not installed
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "wandb" else ModuleSpec(name, None))
    with pytest.raises(ConfigError, match="log.wandb is set but wandb is not installed"):
        MetricsLogger(tmp_path / "r2", is_writer=False, tensorboard=False, resume_step=None,
                      total_steps=1, run_config=cfg)
