"""Every YAML under configs/ is a valid job: it validates, and its env and task set resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayrl.config import load_config
from relayrl.rl.data import load_tasks
from relayrl.rollout.worker import make_env_factory, make_parser

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    make_parser(cfg.rollout.parser)
    if cfg.distill.teachers:  # its teachers are paths on the user's machine
        return
    env = make_env_factory(cfg.env)()
    assert load_tasks(cfg.env, type(env), cfg.run.seed)
    if cfg.eval.tasks is not None:
        held_out = load_tasks(cfg.env.model_copy(update={"tasks": cfg.eval.tasks}), type(env), cfg.run.seed)
        assert held_out
        if cfg.env.tasks is not None and cfg.env.tasks.startswith("pyfunc:"):
            train_ids = {t["id"] for t in load_tasks(cfg.env, type(env), cfg.run.seed)}
            assert not train_ids & {t["id"] for t in held_out}, "a held-out task is also trained on"


def test_the_quickstart_and_the_recipe_evaluate_on_held_out_tasks():
    for name in ("quickstart", "smollm2_coding"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
        assert cfg.eval.tasks == "pyfunc:heldout" and cfg.env.tasks == "pyfunc:train"
        assert cfg.eval.temperature == 0.0 and cfg.eval.every > 0
