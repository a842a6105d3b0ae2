"""Run checkpoints: ``<run_dir>/checkpoints/step_000042/`` holding

- ``policy/``: HF checkpoint (config, safetensors, tokenizer) + optimizer, scheduler and RNG
  state, written by the policy backend;
- ``critic/``: the same for the critic (when there is one);
- ``state.json``: driver state: step, weight version, data cursor, consumed trajectory ids,
  the last step's metrics. Written last.

A checkpoint is built in ``step_000042.tmp`` and renamed into place when complete, so a crash
mid-write leaves only a ``.tmp`` directory that is ignored and removed on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class DriverState:
    """Everything the driver needs to continue exactly where it stopped.

    step: the number of completed training steps.
    weight_version: version of the policy weights (== step).
    slot_cursor: next data slot to issue.
    consumed: trajectory ids trained on or dropped as stale.
    """

    step: int = 0
    weight_version: int = 0
    slot_cursor: int = 0
    consumed: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike[str], keep: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir()
                if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
                and (p / "state.json").is_file()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        done = self._complete()
        return done[-1] if done else None

    def save(self, state: DriverState, writers: dict[str, Callable[[str], None]]) -> Path:
        """Write a checkpoint; ``writers`` maps a sub-directory name to a function writing it."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.root / f"step_{state.step:06d}"
        tmp = self.root / f"step_{state.step:06d}.tmp"
        tmp.mkdir()
        for name, write in writers.items():
            write(str(tmp / name))
        with open(tmp / "state.json", "w") as f:
            json.dump(asdict(state), f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_state(path: Path) -> DriverState:
        return DriverState(**json.loads((path / "state.json").read_text()))
