"""Which teacher scores which sample, and the checks that run before a distillation starts.

Routing is by the sub-trace's ``domain`` (the task's ``domain`` field): each domain has exactly
one owning teacher (the schema enforces it); a domain nobody owns goes to
``distill.fallback_teacher`` if one is set, and is otherwise an error, found at start-up from
the task file rather than mid-run.

The tokenizer check: the teacher scores the *student's* token ids, so a teacher whose
vocabulary maps ids to other strings would score nonsense without any error. Every teacher's
tokenizer is compared with the student's (token -> id maps, special tokens) and so is the
embedding size in ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from relayrl.config import ConfigError, TeacherConfig


class UnknownDomainError(ValueError):
    """A sample's domain has no teacher and no fallback is configured."""


class Router:
    """domain -> teacher name.

    teachers: the configured teachers (their ``domains`` are disjoint).
    fallback: the teacher of every other domain, or None (unknown domains are errors).
    """

    def __init__(self, teachers: list[TeacherConfig], fallback: str | None = None) -> None:
        self.teachers = {t.name: t for t in teachers}
        self.owner = {d: t.name for t in teachers for d in t.domains}
        if fallback is not None and fallback not in self.teachers:
            raise ValueError(f"fallback teacher {fallback!r} is not one of {sorted(self.teachers)}")
        self.fallback = fallback

    def teacher_for(self, domain: str) -> str:
        name = self.owner.get(domain, self.fallback)
        if name is None:
            raise UnknownDomainError(f"no teacher owns the domain {domain!r} (owned: {sorted(self.owner)})")
        return name

    def weight_of(self, domain: str) -> float:
        return self.teachers[self.teacher_for(domain)].weight

    def group(self, domains: list[str]) -> dict[str, list[int]]:
        """Sample indices per teacher (teachers in config order, indices ascending)."""
        out: dict[str, list[int]] = {name: [] for name in self.teachers}
        for i, d in enumerate(domains):
            out[self.teacher_for(d)].append(i)
        return {name: idx for name, idx in out.items() if idx}

    def check_domains(self, domains: Iterable[str], source: str) -> None:
        """Raise ConfigError naming the domains of ``source`` that no teacher owns."""
        unknown = sorted({d for d in domains if d not in self.owner})
        if unknown and self.fallback is None:
            shown = ", ".join(repr(d) for d in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ConfigError(
                f"distill.teachers: the tasks of {source} have domains no teacher owns: {shown}. Add them "
                "to a teacher's domains, or set distill.fallback_teacher to the teacher that should score them."
            )


def teacher_key(t: TeacherConfig) -> str:
    return f"distill.teachers ({t.name!r})"


def check_teacher_dir(t: TeacherConfig) -> Path:
    p = Path(t.path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"{teacher_key(t)}: path {t.path!r} is not an HF checkpoint directory (no config.json "
                          "there). Give the directory the teacher was saved to.")
    return p


def _vocab_size(path: Path) -> int | None:
    cfg = json.loads((path / "config.json").read_text())
    size = cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size"))
    return int(size) if size is not None else None


def check_same_tokenizer(student_path: str | Path, teachers: list[TeacherConfig]) -> None:
    """ConfigError for the first teacher whose vocabulary differs from the student's."""
    from transformers import AutoTokenizer

    s_path = Path(student_path)
    s_tok = AutoTokenizer.from_pretrained(s_path)
    s_vocab = s_tok.get_vocab()
    s_size = _vocab_size(s_path)
    s_special = dict(s_tok.special_tokens_map)
    for t in teachers:
        t_path = check_teacher_dir(t)
        t_size = _vocab_size(t_path)
        if t_size != s_size:
            raise ConfigError(
                f"{teacher_key(t)}: its embedding has {t_size} rows and the student's (model.path) {s_size}. A "
                "teacher scores the student's token ids, so both need the same tokenizer and vocabulary; "
                "use a teacher trained from the student's base model."
            )
        try:
            t_tok = AutoTokenizer.from_pretrained(t_path)
        except Exception as e:  # transformers raises several types for a missing/broken tokenizer
            raise ConfigError(f"{teacher_key(t)}: no loadable tokenizer in {t.path!r} ({type(e).__name__}: {e}). "
                              "Save the teacher's tokenizer next to its weights.") from None
        t_vocab = t_tok.get_vocab()
        if t_vocab != s_vocab:
            diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])
            tok, _ = diff[0]
            example = (f"{tok!r} is id {s_vocab.get(tok, 'absent')} in the student and "
                       f"{t_vocab.get(tok, 'absent')} in the teacher")
            n = len({k for k, _ in diff})
            raise ConfigError(
                f"{teacher_key(t)}: its tokenizer differs from the student's (model.path) in {n} tokens "
                f"({example}). A teacher scores the student's token ids, so both need the same tokenizer; "
                "use a teacher trained from the student's base model."
            )
        if dict(t_tok.special_tokens_map) != s_special:
            raise ConfigError(
                f"{teacher_key(t)}: its special tokens {dict(t_tok.special_tokens_map)} differ from the student's "
                f"{s_special}; both need the same tokenizer (use a teacher trained from the student's base model)."
            )
