"""Build ``envs/tasks/python_tasks.jsonl`` from the task sources in ``envs/tasks/python/``.

A source is one ``NNN_slug.task`` file of sections, each opened by a line ``=== KIND [PATH]``:

    === instruction            the task statement the agent reads
    === file PATH              a starting workspace file (usually stubs)
    === visible PATH           a visible test file (under tests/), in the agent's workspace
    === hidden PATH            a hidden test file, run only at scoring
    === solution PATH          a reference solution file (copied over the workspace)

One file per task keeps a task reviewable in one place; the jsonl is what ``datasets`` loads.

    python scripts/build_tasks.py            # write the jsonl
    python scripts/build_tasks.py --check    # exit 1 if the jsonl is out of date
    python scripts/build_tasks.py --parquet out.parquet   # also write a parquet copy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "envs" / "tasks" / "python"
OUTPUT = ROOT / "envs" / "tasks" / "python_tasks.jsonl"
KINDS = {"instruction": None, "file": "files", "visible": "visible_tests", "hidden": "hidden_tests",
         "solution": "solution"}


def parse_task(path: Path) -> dict:
    task: dict = {"id": path.stem, "domain": "python", "instruction": "", "files": [], "visible_tests": [],
                  "hidden_tests": [], "solution": []}
    kind: str | None = None
    target: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if kind is None:
            return
        text = "\n".join(lines).strip("\n") + "\n"
        if kind == "instruction":
            task["instruction"] = text.strip()
        else:
            task[KINDS[kind]].append({"path": target, "content": text})

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("=== "):
            flush()
            head = line[4:].split()
            kind, target, lines = head[0], (head[1] if len(head) > 1 else None), []
            if kind not in KINDS or (kind == "instruction") != (target is None):
                raise SystemExit(f"{path}:{number}: bad section header {line!r}")
        elif kind is None:
            if line.strip():
                raise SystemExit(f"{path}:{number}: text before the first section")
        else:
            lines.append(line)
    flush()
    for key in ("files", "visible_tests", "hidden_tests", "solution"):
        task[key].sort(key=lambda e: e["path"])
    return task


def build() -> str:
    tasks = [parse_task(p) for p in sorted(SOURCES.glob("*.task"))]
    return "".join(json.dumps(t, ensure_ascii=False, sort_keys=True) + "\n" for t in tasks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the jsonl is not up to date")
    ap.add_argument("--parquet", default=None, help="also write the tasks as parquet to this path")
    args = ap.parse_args()
    text = build()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is out of date: run python scripts/build_tasks.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"{OUTPUT}: {text.count(chr(10))} tasks")
    if args.parquet:
        import datasets

        datasets.Dataset.from_list([json.loads(line) for line in text.splitlines()]).to_parquet(args.parquet)
        print(args.parquet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
