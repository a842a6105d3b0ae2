"""Write a split of the generated function-level Python tasks (``envs/taskgen.py``) as jsonl.

A run reads the same tasks by name without a file (``env.tasks: pyfunc:train``); the file is
for looking at them, or for other tools.

    python scripts/gen_tasks.py --split train --out train.jsonl
    python scripts/gen_tasks.py --split heldout --n 50 --out heldout50.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from relayrl.envs.taskgen import SPLITS, generate_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    parser.add_argument("--n", type=int, default=None, help="only the first N tasks of the split")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws other parameters (default 0: the tasks of pyfunc:train / pyfunc:heldout)")
    args = parser.parse_args()
    tasks = generate_tasks(args.split, seed=args.seed, n=args.n)
    with args.out.open("w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task) + "\n")
    print(f"wrote {len(tasks)} {args.split} tasks to {args.out}")


if __name__ == "__main__":
    main()
