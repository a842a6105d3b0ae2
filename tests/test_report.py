"""metrics.jsonl (MetricsLogger, resume truncation) and the PNG report built from it."""

from __future__ import annotations

import json
import math

import pytest

from relayrl.config import ConfigError, LoggingConfig
from relayrl.metrics import MetricsLogger
from relayrl.report import read_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUIET = LoggingConfig(wandb="disabled", progress=False)


def _metrics_for(step: int) -> dict:
    return {"reward/mean": 0.1 * step, "actor/kl": 0.01 * step, "critic/vf_loss": 1.0 / step}


def _assert_valid_png(path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    image = matplotlib.image.imread(path)  # decodes the whole file
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_logger_writes_flushed_lines_and_no_wandb_when_disabled(tmp_path):
    logger = MetricsLogger(tmp_path / "run", QUIET, "r", {"a": 1}, resume=False)
    logger.log(1, {"reward/mean": 0.5, "ok": True, "note": "x"})
    # Readable before close(): the line is flushed.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "reward/mean": 0.5, "ok": True, "note": "x"}]
    logger.add_rollouts(3)
    logger.close()
    logger.close()  # idempotent
    assert not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "run" / "wandb_run_id").exists()


def test_resumed_run_file_equals_uninterrupted(tmp_path):
    with MetricsLogger(tmp_path / "a", QUIET, "a", {}, resume=False) as logger:
        for step in range(1, 7):
            logger.log(step, _metrics_for(step))
    # Run b: checkpoint after step 3, crashed after logging step 4 and half of step 5's line.
    with MetricsLogger(tmp_path / "b", QUIET, "b", {}, resume=False) as logger:
        for step in range(1, 5):
            logger.log(step, _metrics_for(step))
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')
    with MetricsLogger(tmp_path / "b", QUIET, "b", {}, resume=True, resume_step=3) as logger:
        for step in range(4, 7):
            logger.log(step, _metrics_for(step))
    assert (tmp_path / "b" / "metrics.jsonl").read_bytes() == (tmp_path / "a" / "metrics.jsonl").read_bytes()
    # A fresh (not resumed) run in the same directory starts the file anew.
    with MetricsLogger(tmp_path / "b", QUIET, "b", {}, resume=False) as logger:
        logger.log(1, {"x": 1.0})
    assert read_metrics(tmp_path / "b" / "metrics.jsonl") == [{"step": 1, "x": 1.0}]


def test_wandb_offline_stays_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # must not be used: dir= wins
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, LoggingConfig(wandb="offline", progress=True), "r", {"a": 1},
                       resume=False, total_steps=2) as logger:
        logger.log(1, {"reward/mean": 0.5})
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and offline_runs[0].name.endswith(run_id)
    assert not (tmp_path / "elsewhere").exists()


def test_report_writes_valid_pngs_and_skips_missing_series(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = []
    for step in range(1, 9):
        rec = {"step": step, "reward/mean": 0.1 * step, "reward/max": 0.2 * step, "actor/approx_kl": 0.001 * step,
               "critic/vf_loss": 1.0 / step, "perf/tokens_per_s": 100.0 + step, "flag": True, "phase": "train"}
        if step % 2:
            rec["actor/grad_norm"] = float(step)  # present on odd steps only
        if step == 4:
            rec["critic/vf_loss"] = math.nan
        records.append(json.dumps(rec))
    # no entropy series at all; the last line was cut short by a crash
    (run_dir / "metrics.jsonl").write_text("\n".join(records) + '\n{"step": 9, "rew')
    paths = write_report(run_dir)
    assert [p.name for p in paths] == ["reward.png", "kl.png", "value_loss.png", "tokens_per_s.png",
                                       "all_metrics.png"]
    for p in paths:
        assert p.parent == run_dir / "report"
        _assert_valid_png(p)


def test_report_pages_many_series(tmp_path):
    lines = [json.dumps({"step": s, **{f"m{i}": float(i * s) for i in range(5)}}) for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    names = [p.name for p in write_report(tmp_path, panels_per_page=4)]
    # 5 series, 4 panels a page -> two grid pages; no headline series.
    assert names == ["all_metrics.png", "all_metrics_2.png"]
    # A later report with fewer series leaves no stale second page behind.
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "m0": 1.0}) + "\n")
    assert [p.name for p in write_report(tmp_path, panels_per_page=4)] == ["all_metrics.png"]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["all_metrics.png"]


def test_report_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="has no metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no metrics logged yet"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\nnot json\n{"step": 3, "a": 2}\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        write_report(tmp_path)
