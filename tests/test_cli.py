"""The ``relayrl`` command as a user runs it (a subprocess): user mistakes exit 2 with one
short message naming the key and no traceback; ``config show`` and ``report`` work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from relayrl.config import Config


def relayrl(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "relayrl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


USER_ERRORS = [
    # (id, YAML written to cfg.yaml or None for no file, command line, text the message must contain)
    ("unknown_key", "algorithm:\n  clip_hihg: 0.3\n", ["train", "cfg.yaml"],
     ["algorithm.clip_hihg", "unknown key", "clip_high", "clip_low"]),
    ("wrong_type", "train:\n  steps: many\n", ["train", "cfg.yaml"], ["train.steps", "integer", "'many'"]),
    ("bad_literal", "run:\n  name: t\n", ["train", "cfg.yaml", "algorithm.estimator=ppo"],
     ["algorithm.estimator", "'gae' or 'grpo'"]),
    ("missing_file", None, ["train", "nope.yaml"], ["nope.yaml", "no such config file"]),
    ("invalid_yaml", "train:\n  steps: [1, 2\n", ["config", "show", "cfg.yaml"],
     ["cfg.yaml", "not valid YAML", "line"]),
    ("bad_override", "run:\n  name: t\n", ["train", "cfg.yaml", "train.steps"], ["train.steps", "dotted.key=value"]),
    ("deterministic_lag", "run:\n  deterministic: true\n", ["train", "cfg.yaml", "rollout.max_weight_lag=2"],
     ["rollout.max_weight_lag", "set it to 0"]),
    ("report_missing_dir", None, ["report", "runs/none"], ["runs/none", "no such run directory"]),
]


@pytest.mark.parametrize("yaml_text,argv,needles", [e[1:] for e in USER_ERRORS], ids=[e[0] for e in USER_ERRORS])
def test_user_mistakes_exit_2_with_a_short_message(tmp_path, yaml_text, argv, needles):
    if yaml_text is not None:
        (tmp_path / "cfg.yaml").write_text(yaml_text)
    proc = relayrl(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) <= 4, proc.stderr  # one paragraph, not a dump


@pytest.mark.parametrize("argv", [["train"], ["frobnicate"], ["convert-model", "llama"], []],
                         ids=["missing_config", "unknown_command", "unknown_model", "no_command"])
def test_usage_errors_exit_2(tmp_path, argv):
    proc = relayrl(*argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: relayrl" in proc.stderr and "Traceback" not in proc.stderr


def test_config_show_prints_the_full_validated_config(tmp_path):
    (tmp_path / "cfg.yaml").write_text("rollout:\n  group_size: 4\nalgorithm:\n  estimator: grpo\n")
    proc = relayrl("config", "show", "cfg.yaml", "train.steps=3", "trainer.policy.lr=2e-6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    expected = Config.model_validate({"rollout": {"group_size": 4}, "algorithm": {"estimator": "grpo"},
                                      "train": {"steps": 3}, "trainer": {"policy": {"lr": 2e-6}}})
    assert shown == expected.model_dump(mode="json")
    # Every default is spelled out, e.g. a key the file never mentioned:
    assert shown["algorithm"]["clip_high"] == 0.28
    # And the output is itself a valid config that loads to the same thing.
    (tmp_path / "full.yaml").write_text(proc.stdout)
    again = relayrl("config", "show", "full.yaml", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == proc.stdout


def test_report_command_writes_plots(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"step": s, "reward/mean": 0.1 * s, "actor/entropy": 1.0 - 0.1 * s}) for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = relayrl("report", "runs/demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    assert [os.path.basename(p) for p in printed] == ["reward.png", "entropy.png", "all_metrics.png"]
    for p in printed:
        assert (tmp_path / p).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
