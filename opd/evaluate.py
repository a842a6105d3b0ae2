"""``relayrl eval``: per-domain metrics of a student and of each teacher on the tasks' prompts.

For every task, the prompt is what the env's ``reset`` gives the agent (formatted by the chat
template, token-exact as in rollouts). Then, per domain:

- ``reverse_kl``: KL(student || owning teacher) over the whole vocabulary (``exact_reverse_kl``),
  averaged over the positions of the student's greedy completion, then over the domain's tasks;
- ``match``: the fraction of tasks where the student's greedy completion equals the owning
  teacher's, token for token (up to and including the stop token);
- ``accuracy`` (student and teacher): the fraction whose completion's first word is the task's
  ``answer``, for tasks that have one;
- ``response_tokens`` (student and teacher): mean greedy completion length.

Teachers are loaded one at a time (HF transformers on the CPU), so evaluation needs memory for
the student plus one teacher. The report is printed as a table and written as JSON.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from relayrl.config import Config, ConfigError
from relayrl.model import resolve_model_path

from .routing import Router, check_same_tokenizer
from .signal import exact_reverse_kl


@dataclass
class _Case:
    task: dict[str, Any]
    domain: str
    prompt_ids: list[int]
    student_ids: list[int] | None = None
    student_logits: torch.Tensor | None = None  # (n, V) at the student's completion positions


def _load(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model


@torch.no_grad()
def greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy completion (argmax each step), ending with the first stop token if one comes."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids),
                         pad_token_id=sorted(stop_ids)[0], temperature=None, top_p=None, top_k=None)
    completion = out[0, len(prompt_ids):].tolist()
    for i, tok in enumerate(completion):
        if tok in stop_ids:
            return completion[: i + 1]
    return completion


@torch.no_grad()
def completion_logits(model: Any, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """(n, V) next-token logits at the positions that predict ``completion``'s n tokens."""
    ids = torch.tensor([prompt_ids + completion])
    logits = model(input_ids=ids).logits[0].float()
    p = len(prompt_ids)
    return logits[p - 1 : p - 1 + len(completion)]


def _prompt_cases(cfg: Config, tasks: list[dict[str, Any]], tokenizer: Any) -> tuple[list[_Case], list[int]]:
    from relayrl.envs.base import task_domain
    from relayrl.rollout.chat import ChatFormat
    from relayrl.rollout.worker import make_env_factory, make_parser

    make_env = make_env_factory(cfg.env)
    chat = ChatFormat(tokenizer, make_parser(cfg.rollout.parser))

    async def first_prompt(task: dict[str, Any]) -> list[int]:
        env = make_env()
        try:
            reset = await env.reset(task)
        finally:
            await env.close()
        messages = chat.with_tool_instructions(reset.messages, reset.tools)
        return chat.prompt_ids(messages, reset.tools)

    return [_Case(t, task_domain(t), asyncio.run(first_prompt(t))) for t in tasks], chat.stop_token_ids


def _first_word(tokenizer: Any, ids: list[int]) -> str | None:
    words = tokenizer.decode(ids, skip_special_tokens=True).split()
    return words[0] if words else None


def evaluate(cfg: Config, student_path: str | None = None) -> dict[str, Any]:
    """Per-domain metrics of the student (default: ``<run_dir>/student`` if it exists, else
    ``model.path``) and of each teacher on its own domains. Returns the report as a dict."""
    from transformers import AutoTokenizer

    from relayrl.rl.data import load_tasks
    from relayrl.rollout.worker import make_env_factory

    d = cfg.distill
    if not d.teachers:
        raise ConfigError("distill.teachers: no teachers configured; relayrl eval compares the student with them")
    if student_path is None:
        default = cfg.run.run_dir / "student"
        student_path = str(default) if (default / "config.json").is_file() else cfg.model.path
    student_dir = resolve_model_path(student_path, cfg.model.cache_dir)
    check_same_tokenizer(student_dir, d.teachers)
    env_cfg = cfg.env.model_copy(update={"tasks": d.eval_tasks}) if d.eval_tasks else cfg.env
    cfg_eval = cfg.model_copy(update={"env": env_cfg})
    env_cls = type(make_env_factory(env_cfg)())
    tasks = load_tasks(env_cfg, env_cls, cfg.run.seed)
    router = Router(d.teachers, d.fallback_teacher)
    router.check_domains([str(t.get("domain", "")) for t in tasks], env_cfg.tasks or env_cfg.name)

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    cases, stop = _prompt_cases(cfg_eval, tasks, tokenizer)
    stop_ids = set(stop)
    max_new = d.eval_max_new_tokens

    student = _load(student_dir)
    for c in cases:
        c.student_ids = greedy(student, c.prompt_ids, max_new, stop_ids)
        c.student_logits = completion_logits(student, c.prompt_ids, c.student_ids)
    del student

    per_domain: dict[str, dict[str, list[float]]] = {}
    groups = router.group([c.domain for c in cases])
    for name, idx in groups.items():
        teacher = _load(d.teachers[[t.name for t in d.teachers].index(name)].path)
        for i in idx:
            c = cases[i]
            assert c.student_ids is not None and c.student_logits is not None
            t_logits = completion_logits(teacher, c.prompt_ids, c.student_ids)
            kl = exact_reverse_kl(c.student_logits[None], t_logits[None], torch.ones(1, len(c.student_ids)))
            t_ids = greedy(teacher, c.prompt_ids, max_new, stop_ids)
            row = per_domain.setdefault(c.domain, {})
            row.setdefault("student/reverse_kl", []).append(float(kl.sum() / max(len(c.student_ids), 1)))
            row.setdefault("student/match_teacher", []).append(float(t_ids == c.student_ids))
            row.setdefault("student/response_tokens", []).append(float(len(c.student_ids)))
            row.setdefault("teacher/response_tokens", []).append(float(len(t_ids)))
            answer = c.task.get("answer")
            if answer is not None:
                row.setdefault("student/accuracy", []).append(float(_first_word(tokenizer, c.student_ids) == answer))
                row.setdefault("teacher/accuracy", []).append(float(_first_word(tokenizer, t_ids) == answer))
        del teacher

    report: dict[str, Any] = {"student": str(student_dir), "domains": {}}
    for dom in sorted(per_domain):
        row = {k: sum(v) / len(v) for k, v in per_domain[dom].items()}
        row["teacher"] = router.teacher_for(dom)
        row["tasks"] = len(per_domain[dom]["student/reverse_kl"])
        report["domains"][dom] = row
    return report


def format_report(report: dict[str, Any]) -> str:
    cols = ["teacher", "tasks", "student/reverse_kl", "student/match_teacher", "student/accuracy", "teacher/accuracy"]
    lines = [f"student: {report['student']}", "domain".ljust(14) + "".join(c.rjust(24) for c in cols)]
    for dom, row in report["domains"].items():
        cells = []
        for c in cols:
            v = row.get(c, "-")
            cells.append((f"{v:.4f}" if isinstance(v, float) else str(v)).rjust(24))
        lines.append(dom.ljust(14) + "".join(cells))
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
