"""Run many tasks' hidden tests against several solution files in one process (fast; no pytest).

    python run_hidden_tests.py ROOT

ROOT holds one directory per task: ``test_hidden.py`` and one sub-directory per variant
(``reference/``, ``stub/``, ``wrong/``), each with a ``solution.py``. For every task and variant
the variant's ``solution.py`` is imported as the module ``solution``, then the hidden test
module is executed and each ``test_*`` function called (at most 2 s each). Prints one JSON
object: {task: {variant: [passed, total]}}. A hidden module that fails to import counts as one
failed test, like pytest's junit report in the coding env.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path


class _Timeout(BaseException):
    """Not an Exception, so a solution's own ``except Exception`` cannot swallow it."""


def _alarm(signum, frame):
    raise _Timeout


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_variant(task_dir: Path, variant: str, index: int) -> list[int]:
    sys.modules.pop("solution", None)
    try:
        sys.modules["solution"] = _load("solution", task_dir / variant / "solution.py")
        hidden = _load(f"hidden_{index}_{variant}", task_dir / "test_hidden.py")
    except Exception:
        return [0, 1]
    tests = [f for name, f in vars(hidden).items() if name.startswith("test_") and callable(f)]
    passed = 0
    for test in tests:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        try:
            test()
            passed += 1
        except (Exception, _Timeout):
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return [passed, len(tests)]


def main() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    root = Path(sys.argv[1])
    results = {}
    for index, task_dir in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        variants = sorted(p.name for p in task_dir.iterdir() if p.is_dir())
        results[task_dir.name] = {v: run_variant(task_dir, v, index) for v in variants}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
