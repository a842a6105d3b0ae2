"""``relayrl report RUN_DIR``: PNG plots of a run's ``metrics.jsonl``.

Writes into ``<run_dir>/report/``:

- one plot per headline quantity, when the run logged it: ``reward.png``, ``eval.png``
  (held-out pass@k and reward), ``kl.png``, ``value_loss.png``, ``entropy.png``,
  ``tokens_per_s.png`` (every series whose name matches, e.g. ``reward/mean`` and ``reward/max``
  share ``reward.png``);
- ``learning.png``: training reward and held-out pass@1 against step, when both were logged;
- ``all_metrics.png`` (``all_metrics_2.png``, ... past 24 series a page): a grid with every numeric
  series, one panel each.

Steps logged twice (a run resumed without truncation) keep their last record.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from relayrl.config import ConfigError
from relayrl.metrics import METRICS_FILE

PANELS_PER_PAGE = 24
GRID_COLUMNS = 4

# (file stem, title, does this metric name belong here?)
_PARTS = re.compile(r"[/_.\-\s]+")


def _has_part(*parts: str):
    return lambda name: any(p in _PARTS.split(name.lower()) for p in parts)


def _contains(*subs: str):
    return lambda name: any(s in name.lower() for s in subs)


HEADLINE_PLOTS = [
    ("reward", "Reward", lambda name: "reward" in name.lower() and not name.startswith("eval/")),
    ("eval", "Held-out evaluation (eval/*)", lambda name: name.startswith("eval/pass@") or name == "eval/reward"),
    ("kl", "KL", _has_part("kl")),
    ("value_loss", "Value loss", _contains("vf_loss", "value_loss", "critic/loss")),
    ("entropy", "Entropy", _contains("entropy")),
    ("tokens_per_s", "Tokens / s", _contains("tokens_per_s", "tokens/s", "tok_per_s", "throughput")),
]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, one per step, sorted by step (last record wins).

    A last line cut short by a crash is ignored; any other unreadable line is a user error.
    """
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines()
    by_step: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue  # a write interrupted by a crash
            raise ConfigError(f"{p}: line {i + 1} is not JSON ({e.msg}). Fix or delete that line.") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ConfigError(f"{p}: line {i + 1} has no integer 'step'; each line must be one step's metrics.")
        by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def numeric_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) for every metric that holds a number (bools excluded), in the
    order names first appear. Steps where a metric is absent are left out of its series."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for name, value in record.items():
            if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return series


def _locate(run_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    given = Path(run_dir)
    if given.is_file() and given.suffix == ".jsonl":
        return given.parent, given
    if not given.is_dir():
        raise ConfigError(
            f"{given}: no such run directory. Pass the directory of a run "
            "(<run.output_dir>/<run.name>, e.g. runs/relayrl), which holds metrics.jsonl."
        )
    path = given / METRICS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{given}: has no {METRICS_FILE}. Pass the directory of a run that has trained at least one step "
            "(<run.output_dir>/<run.name>)."
        )
    return given, path


def _learning_plot(series: dict[str, tuple[list[int], list[float]]], figure: Any) -> Any:
    """Training reward and held-out pass@1 against step, on one axis (both in [0, 1] for
    pass-fraction rewards): the curve a learning claim is read from."""
    fig = figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    steps, values = series["reward/mean"]
    ax.plot(steps, values, alpha=0.5, label="training reward (reward/mean)")
    if len(values) >= 5:  # a trailing mean over 5 steps: the per-step batch is small and noisy
        smooth = [sum(values[max(0, i - 4):i + 1]) / len(values[max(0, i - 4):i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, color="C0", label="training reward, mean of 5 steps")
    steps, values = series["eval/pass@1"]
    ax.plot(steps, values, marker="o", color="C3", label="held-out pass@1 (eval/pass@1)")
    ax.set_title("Learning: training reward and held-out pass@1")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def write_report(run_dir: str | os.PathLike[str], panels_per_page: int = PANELS_PER_PAGE) -> list[Path]:
    """Write the plots of ``run_dir``'s metrics.jsonl; return the PNG paths written.

    ``run_dir`` may also be the metrics.jsonl file itself. ``panels_per_page``: panels of one
    grid page.

    Raises ConfigError when the directory or the file is missing, or holds no numbers.
    """
    run_dir, path = _locate(run_dir)
    records = read_metrics(path)
    series = numeric_series(records)
    if not series:
        raise ConfigError(f"{path}: no metrics logged yet. Train at least one step, then run the report again.")

    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, title, belongs in HEADLINE_PLOTS:
        names = [n for n in series if belongs(n)]
        if not names:
            continue
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize="small")
        target = out_dir / f"{stem}.png"
        fig.savefig(target, dpi=100)
        written.append(target)

    if "reward/mean" in series and "eval/pass@1" in series:
        target = out_dir / "learning.png"
        _learning_plot(series, Figure).savefig(target, dpi=100)
        written.append(target)

    for stale in out_dir.glob("all_metrics_*.png"):  # pages of an earlier, longer report
        stale.unlink()
    names = list(series)
    pages = [names[i:i + panels_per_page] for i in range(0, len(names), panels_per_page)]
    for page_no, page in enumerate(pages, start=1):
        cols = min(GRID_COLUMNS, len(page))
        rows = math.ceil(len(page) / cols)
        # A fixed layout: the constrained layout engine doubles the drawing time of a grid.
        fig = Figure(figsize=(3.2 * cols, 2.4 * rows))
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / rows / 2.4 * 1.2, top=1 - 0.35 / (2.4 * rows),
                            hspace=0.55, wspace=0.3)
        for i, name in enumerate(page):
            ax = fig.add_subplot(rows, cols, i + 1)
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_title(name, fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.locator_params(nbins=4)
            ax.grid(alpha=0.3)
        target = out_dir / ("all_metrics.png" if page_no == 1 else f"all_metrics_{page_no}.png")
        fig.savefig(target, dpi=80)
        written.append(target)
    return written
