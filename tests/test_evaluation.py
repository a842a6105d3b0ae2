"""Held-out evaluation: the pass@k estimator and the summary by hand, then ``relayrl eval`` and
``eval.every`` end to end (a real Ray cluster, CPU engine and rollout worker in a subprocess)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relayrl.config import ConfigError, load_config
from relayrl.metrics import plain_line
from relayrl.rl.evaluation import ks_for, pass_at_k, resolve_checkpoint, summarize

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "support" / "evalpkg"


# ----------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 1, 1, 0.25),           # k = 1 is the pass fraction c/n
    (4, 0, 4, 0.0),            # nothing passed
    (4, 4, 1, 1.0),            # everything passed
    (3, 1, 3, 1.0),            # n - c < k: any 3 of 3 include the pass
])
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                reference = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(reference, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (0, 0, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(5) == [1, 2, 4, 5]
    assert ks_for(8) == [1, 2, 4, 8]


def _record(task: int, passed: bool, reward: float, failed: bool = False, **counts: float) -> dict:
    base = {"task_id": f"t{task}", "task_index": task, "passed": passed, "reward": reward, "failed": failed,
            "turns": 1.0, "response_tokens": 10.0, "tool_calls": 1.0, "tool_errors": 0.0, "format_errors": 0.0,
            "truncated": 0.0}
    return base | counts


def test_summary_by_hand():
    # Task 0: one of two passed; task 1: none of two. pass@1 = (1/2 + 0) / 2; pass@2 = (1 + 0) / 2.
    records = [_record(0, True, 1.0, turns=2.0), _record(0, False, 0.5, format_errors=2.0),
               _record(1, False, 0.0), _record(1, False, 0.25, tool_errors=1.0)]
    s = summarize(records, samples=2)
    assert s["eval/tasks"] == 2 and s["eval/episodes"] == 4 and s["eval/failed"] == 0
    assert s["eval/pass@1"] == pytest.approx(0.25)
    assert s["eval/pass@2"] == pytest.approx(0.5)
    assert s["eval/reward"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.25) / 4)
    assert s["eval/turns"] == pytest.approx(5 / 4)
    assert s["eval/format_errors"] == pytest.approx(0.5)
    assert s["eval/tool_errors"] == pytest.approx(0.25)


def test_a_failed_episode_is_counted_not_scored():
    # Task 1's only episode could not run: it is neither a pass nor a fail, so pass@1 is task 0's.
    records = [_record(0, True, 1.0), _record(1, False, 0.0, failed=True)]
    s = summarize(records, samples=1)
    assert s["eval/failed"] == 1
    assert s["eval/pass@1"] == pytest.approx(1.0)
    assert s["eval/reward"] == pytest.approx(1.0)


def test_resolve_checkpoint(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run = tmp_path / "run"
    for step in ("step_000002", "step_000010"):
        (run / "checkpoints" / step / "policy").mkdir(parents=True)
        (run / "checkpoints" / step / "policy" / "config.json").write_text("{}")
    assert resolve_checkpoint(None, "base") == "base"
    assert resolve_checkpoint(str(model), "base") == str(model)
    assert resolve_checkpoint(str(run / "checkpoints" / "step_000002"), "base") == \
        str(run / "checkpoints" / "step_000002" / "policy")
    assert resolve_checkpoint(str(run), "base") == str(run / "checkpoints" / "step_000010" / "policy")
    with pytest.raises(ConfigError, match="--checkpoint"):
        resolve_checkpoint(str(tmp_path / "nothing"), "base")


def test_eval_config_is_checked():
    assert load_config(None, ["eval.temperature=0"]).eval.temperature == 0.0
    with pytest.raises(ConfigError, match="eval.samples"):
        load_config(None, ["eval.samples=4"])  # greedy samples would all be the same
    assert load_config(None, ["eval.samples=4", "eval.temperature=0.8"]).eval.samples == 4
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(None, ["eval.every=5"])  # no held-out tasks named


def test_plain_step_line():
    record = {"step": 3, "reward/mean": 0.125, "rollout/env/all_pass": 0.1, "eval/pass@1": 0.05, "loss": 1.0}
    assert plain_line(record, 20, 42.14) == "step 3/20 | reward 0.125 | pass 0.100 | eval pass@1 0.050 | 42.1 s"
    assert plain_line({"step": 1}, None, 1.0) == "step 1 | 1.0 s"


# ----------------------------------------------------------------------------- end to end


def _write_tasks(path: Path, rewards: list[float], broken: int | None = None) -> Path:
    with path.open("w") as f:
        for i, r in enumerate(rewards):
            f.write(json.dumps({"id": f"task-{i}", "reward": r, "broken": i == broken}) + "\n")
    return path


def _relayrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SUPPORT), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "relayrl", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _tiny_config(tmp_path: Path, model_dir: Path) -> Path:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"""
run: {{output_dir: {tmp_path}, name: evalrun}}
model: {{path: {model_dir}}}
engine: {{max_batch_size: 8, max_seq_len: 256, num_threads: 1}}
env: {{name: "eval_envs:FixedRewardEnv"}}
rollout: {{parser: plain, max_turns: 1, max_new_tokens: 3, max_context_tokens: 256, max_episode_retries: 1}}
ray: {{num_cpus: 2}}
logging: {{wandb: disabled, progress: false}}
""")
    return cfg


@pytest.mark.slow
def test_relayrl_eval_scores_through_the_agent_loop(tmp_path, tiny_model_dir):
    """Rewards known in advance (1, 0, 1, 0.5) through the real engine, worker, env and CLI:
    pass@1 = 2/4, the mean reward 2.5/4; with two sampled episodes a task, pass@2 as well; a
    task whose sandbox dies makes the command exit 3 naming it, its episodes still written."""
    cfg = _tiny_config(tmp_path, tiny_model_dir)
    tasks = _write_tasks(tmp_path / "held_out.jsonl", [1.0, 0.0, 1.0, 0.5])
    out = tmp_path / "greedy.jsonl"
    proc = _relayrl("eval", str(cfg), "--tasks", str(tasks), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["task-0", "task-1", "task-2", "task-3"]
    assert [r["passed"] for r in records] == [True, False, True, False]
    assert all(r["turns"] == 1.0 and "transcript" in r for r in records)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["eval/pass@1"] == pytest.approx(0.5)
    assert summary["eval/reward"] == pytest.approx(0.625)
    assert summary["temperature"] == 0.0
    assert "pass@1" in proc.stdout and str(out) in proc.stdout

    out2 = tmp_path / "sampled.jsonl"
    proc = _relayrl("eval", str(cfg), "--tasks", str(tasks), "--samples", "2", "--out", str(out2),
                    "eval.temperature=1.0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out2.with_suffix(".summary.json").read_text())
    assert summary["eval/episodes"] == 8
    assert summary["eval/pass@1"] == pytest.approx(0.5) and summary["eval/pass@2"] == pytest.approx(0.5)

    broken = _write_tasks(tmp_path / "broken.jsonl", [1.0, 1.0, 0.0], broken=1)
    out3 = tmp_path / "broken_out.jsonl"
    proc = _relayrl("eval", str(cfg), "--tasks", str(broken), "--out", str(out3), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "1 of 3 evaluation episodes could not run (sandbox)" in proc.stderr and "task-1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(out3.read_text().splitlines()) == 3


@pytest.mark.slow
def test_training_evaluates_held_out_tasks_every_n_steps(tmp_path, tiny_model_dir):
    """``eval.every: 1`` over two steps: held-out metrics at steps 0 (the initial weights), 1 and
    2 in metrics.jsonl, the episodes of each in eval/, the learning plot in the report, and one
    plain line per step on a stderr that is not a terminal."""
    cfg = _tiny_config(tmp_path, tiny_model_dir)
    train_tasks = _write_tasks(tmp_path / "train.jsonl", [1.0, 0.0, 1.0, 0.0])
    held_out = _write_tasks(tmp_path / "held_out.jsonl", [1.0, 0.0, 0.0])
    proc = _relayrl("train", str(cfg), f"env.tasks={train_tasks}", f"eval.tasks={held_out}", "eval.every=1",
                    "train.steps=2", "rollout.tasks_per_step=2", "trainer.micro_batch_size=2",
                    "logging.progress=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "evalrun"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert all(m["eval/pass@1"] == pytest.approx(1 / 3) for m in lines)
    assert all(m["eval/tasks"] == 3 for m in lines)
    assert sorted(p.name for p in (run_dir / "eval").glob("*.jsonl")) == \
        ["step_000000.jsonl", "step_000001.jsonl", "step_000002.jsonl"]
    plain = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert len(plain) == 3 and re.match(r"step 1/2 \| reward [01]\.\d{3} \| eval pass@1 0\.333 \| \d+\.\d s$",
                                        plain[1]), plain
    report = _relayrl("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (run_dir / "report" / "learning.png").is_file() and (run_dir / "report" / "eval.png").is_file()


def test_eval_diff_names_the_tasks_that_flipped(tmp_path, capsys):
    from relayrl.cli import main

    def write(name: str, passed: list[bool]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(_record(i, p, float(p)) | {"task_id": f"t{i}", "family": f"f{i % 2}"}) + "\n"
                                for i, p in enumerate(passed)))
        return path

    before = write("before.jsonl", [True, False, False, True])
    after = write("after.jsonl", [True, True, True, False])
    assert main(["eval-diff", str(before), str(after)]) == 0
    out = capsys.readouterr().out
    assert "pass@1                0.5000    0.7500" in out
    assert "passing before 2, after 3; gained 2, lost 1" in out
    assert "gained: t1, t2" in out and "lost: t3" in out
    assert "f0                        1 -> 2  / 2" in out and "f1                        1 -> 1  / 2" in out
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    assert main(["eval-diff", str(before), str(tmp_path / "bad.jsonl")]) == 2
    assert "not an episode record" in capsys.readouterr().err
