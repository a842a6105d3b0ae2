"""Where a run's numbers go: ``<run_dir>/metrics.jsonl``, wandb, and a progress display.

- ``metrics.jsonl``: one JSON object per training step, ``{"step": k, "<name>": value, ...}``,
  flushed as it is written, so a crash loses at most the step being written. On resume from the
  checkpoint of step k, lines of steps after k (written before the crash, never checkpointed)
  are dropped, so the file of a resumed run equals that of an uninterrupted one.
  ``relayrl report`` turns it into PNG plots.
- wandb: ``offline`` (default) writes under ``<run_dir>/wandb`` and never touches the network;
  ``online`` syncs; ``disabled`` imports and calls nothing of wandb. The run id is kept in
  ``<run_dir>/wandb_run_id`` so a resumed run continues the same wandb run.
- A rich progress display (on stderr) of training steps and finished rollouts when stderr is a
  terminal; otherwise (CI, ``| tee``, nohup) one plain line per step: step, reward, pass rate,
  held-out pass@1 when evaluated, seconds.

Metric names are free-form; ``/`` groups them (``reward/mean``, ``actor/pg_loss``). The report
recognises names containing ``reward``, ``kl``, ``vf_loss``/``value_loss``, ``entropy`` and
``tokens_per_s`` for its dedicated plots and puts every numeric series in a grid.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from relayrl.config import ConfigError, LoggingConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar: tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of ``path`` whose step is <= ``last_step`` (and that parse: a line
    cut short by a crash is dropped). Atomic: the file is rewritten aside and renamed."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Log one dict of scalars per step to metrics.jsonl, wandb and the progress display.

    Args:
        run_dir: the run directory (created if missing).
        cfg: the ``logging`` section.
        run_name: wandb run name.
        config_dict: the full config as plain data, stored with the wandb run.
        resume: continue a run: keep metrics.jsonl up to ``resume_step`` and the wandb run id.
            Otherwise metrics.jsonl is started afresh.
        resume_step: the step the run (re)starts after (the checkpoint's step; 0 for a new run).
        total_steps: steps of the whole run, for the progress bar (None: no total).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        cfg: LoggingConfig,
        run_name: str,
        config_dict: dict[str, Any],
        resume: bool,
        *,
        resume_step: int = 0,
        total_steps: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.path = self.run_dir / METRICS_FILE
        if resume:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._wandb = self._start_wandb(run_name, config_dict, resume) if cfg.wandb != "disabled" else None
        self._file = open(self.path, "a", encoding="utf-8")
        self._progress = None
        self._rollouts = 0
        self._plain_lines = False
        self._total_steps = total_steps
        self._last_log = time.monotonic()
        if cfg.progress:
            if sys.stderr.isatty():
                self._start_progress(resume_step, total_steps)
            else:
                self._plain_lines = True
        self._closed = False

    # -- wandb -------------------------------------------------------------------------------
    def _start_wandb(self, run_name: str, config_dict: dict[str, Any], resume: bool):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        try:
            return wandb.init(
                project=self.cfg.project,
                name=run_name,
                id=run_id,
                dir=str(self.run_dir),
                mode=self.cfg.wandb,
                config=config_dict,
                resume="allow" if resume else None,
                reinit="create_new",
                # console capture would wrap stdout/stderr under the progress display.
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # wandb raises many types for login/network problems
            if self.cfg.wandb == "online":
                raise ConfigError(
                    f"logging.wandb=online: wandb could not start ({type(e).__name__}: {e}). "
                    "Run `wandb login` (or set WANDB_API_KEY), or set logging.wandb=offline and "
                    "sync the run later with `wandb sync`."
                ) from None
            raise

    # -- progress ----------------------------------------------------------------------------
    def _start_progress(self, resume_step: int, total_steps: int | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
        )
        self._steps_task = self._progress.add_task("steps", total=total_steps, completed=resume_step, info="")
        self._rollouts_task = self._progress.add_task("rollouts", total=None, info="")
        self._progress.start()

    def add_rollouts(self, n: int = 1) -> None:
        """Count ``n`` more finished rollouts (episodes) in the progress display."""
        self._rollouts += n
        if self._progress is not None:
            self._progress.update(self._rollouts_task, advance=n)

    def message(self, text: str) -> None:
        """Print a line above the progress display (or to stderr without one)."""
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    # -- logging -----------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the metrics of training step ``step`` (1-based: the step just completed)."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log after close()")
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if key == "step":
                continue
            record[str(key)] = _plain(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._progress is not None:
            self._progress.update(self._steps_task, completed=record["step"], info=_headline(record))
        now = time.monotonic()
        if self._plain_lines:
            print(plain_line(record, self._total_steps, now - self._last_log), file=sys.stderr, flush=True)
        self._last_log = now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plain_line(record: dict[str, Any], total_steps: int | None, seconds: float) -> str:
    """One step as one line of text, for logs that are not a terminal."""
    step = f"step {record['step']}" + (f"/{total_steps}" if total_steps else "")
    parts = [step]
    for key, label in (("reward/mean", "reward"), ("rollout/env/all_pass", "pass"), ("eval/pass@1", "eval pass@1")):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            parts.append(f"{label} {value:.3f}")
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


def _headline(record: dict[str, Any]) -> str:
    """A short summary for the progress line: the first reward-like number, if any."""
    for key, value in record.items():
        if "reward" in key and isinstance(value, float) and math.isfinite(value):
            return f"{key} {value:.3f}"
    return ""
