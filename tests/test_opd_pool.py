"""Routing, the teacher pool (loads, eviction, budgets, scores) with real CPU engines, the
tokenizer check, and the start-up errors of ``relayrl distill`` / ``relayrl eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from relayrl.cli import main
from relayrl.config import ConfigError, TeacherConfig
from relayrl.model import make_tiny_model
from relayrl.opd.pool import CpuTeacherLoader, PoolBudgetError, TeacherPool, checkpoint_bytes
from relayrl.opd.routing import Router, UnknownDomainError, check_same_tokenizer

WORDS = ["topic", "d0", "d1", "d2", "a0", "a1", "a2", "q0", "q1"]


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """Five tiny random teachers sharing one tokenizer (different seeds = different weights)."""
    root = tmp_path_factory.mktemp("teachers")
    return [make_tiny_model(root / f"t{k}", words=WORDS, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            intermediate_size=32, max_position_embeddings=64, seed=k) for k in range(5)]


def teachers_of(dirs: list[Path]) -> list[TeacherConfig]:
    return [TeacherConfig(name=f"t{k}", path=str(p), domains=[f"d{k}"]) for k, p in enumerate(dirs)]


class RecordingLoader:
    """The real CPU-engine loader, recording which teacher it loaded when."""

    def __init__(self) -> None:
        self.inner = CpuTeacherLoader(max_batch_size=8, max_seq_len=64, num_threads=1)
        self.loaded: list[str] = []

    def __call__(self, t: TeacherConfig):
        self.loaded.append(t.name)
        return self.inner(t)


# -- routing -------------------------------------------------------------------------------------


def test_router_sends_each_domain_to_its_owner_and_unknown_ones_to_the_fallback_or_an_error():
    ts = [TeacherConfig(name="math", path="/m", domains=["algebra", "geometry"]),
          TeacherConfig(name="code", path="/c", domains=["python"], weight=0.5)]
    r = Router(ts)
    assert [r.teacher_for(d) for d in ("algebra", "geometry", "python")] == ["math", "math", "code"]
    assert r.weight_of("python") == 0.5
    assert r.group(["python", "algebra", "python", "geometry"]) == {"math": [1, 3], "code": [0, 2]}
    with pytest.raises(UnknownDomainError, match="'poetry'"):
        r.teacher_for("poetry")
    with pytest.raises(ConfigError, match=r"distill.teachers: .* 'poetry'.*distill.fallback_teacher"):
        r.check_domains(["python", "poetry"], "tasks.jsonl")
    fb = Router(ts, fallback="code")
    assert fb.teacher_for("poetry") == "code"
    fb.check_domains(["poetry"], "tasks.jsonl")  # no error with a fallback


# -- the pool ------------------------------------------------------------------------------------


def reference_logprobs(path: Path, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) by HF transformers, independently of the CPU engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [0.0] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_pool_scores_each_request_with_its_own_teacher(teacher_dirs):
    pool = TeacherPool(teachers_of(teacher_dirs[:3]), RecordingLoader(), max_resident=1)
    try:
        seqs = [[1, 5, 6, 7], [1, 8, 9], [1, 5, 5, 10, 11], [1, 7]]
        names = ["t2", "t0", "t1", "t2"]
        out = pool.score(list(zip(names, seqs)))
    finally:
        pool.close()
    for name, ids, lp in zip(names, seqs, out):
        ref = reference_logprobs(teacher_dirs[int(name[1])], ids)
        assert lp == pytest.approx(ref, abs=2e-5)
    # the teachers really differ, so a mix-up would show
    assert reference_logprobs(teacher_dirs[0], seqs[0]) != pytest.approx(out[0], abs=1e-3)


def test_resident_first_loads_only_the_missing_teachers_and_evicts_lru(teacher_dirs):
    loader = RecordingLoader()
    pool = TeacherPool(teachers_of(teacher_dirs), loader, max_resident=2)
    every = [(f"t{k}", [1, 2, 3]) for k in range(5)]
    try:
        pool.score(every)
        s = pool.stats()
        # nothing resident: 5 loads, 3 evictions (room for 2), the last two loaded stay
        assert (s["loads"], s["evictions"], s["resident"]) == (5.0, 3.0, 2.0)
        assert pool.resident_names() == ["t3", "t4"]
        assert s["tokens"] == 15.0
        pool.score(every)
        s = pool.stats()
        # t3, t4 served first without a load; then t0, t1, t2: 3 loads, 3 evictions
        assert (s["loads"], s["evictions"]) == (3.0, 3.0)
        assert loader.loaded == ["t0", "t1", "t2", "t3", "t4", "t0", "t1", "t2"]
        assert pool.resident_names() == ["t1", "t2"]
        # only t1 needed: no load; then t3 evicts the least recently used, t2 (t1 was just used)
        pool.score([("t1", [1, 2])])
        pool.score([("t3", [1, 2])])
        assert pool.resident_names() == ["t1", "t3"]
        assert pool.stats()["loads"] == 1.0
    finally:
        pool.close()


def test_config_order_baseline_reloads_every_teacher(teacher_dirs):
    """Plain LRU in a fixed order thrashes: each teacher is evicted just before it is needed."""
    pool = TeacherPool(teachers_of(teacher_dirs), RecordingLoader(), max_resident=2, schedule="config_order")
    every = [(f"t{k}", [1, 2, 3]) for k in range(5)]
    try:
        pool.score(every)
        pool.stats()
        pool.score(every)
        assert pool.stats()["loads"] == 5.0
    finally:
        pool.close()


def test_memory_budget_evicts_until_the_new_teacher_fits(teacher_dirs):
    sizes = {"t0": 3, "t1": 3, "t2": 5}
    pool = TeacherPool(teachers_of(teacher_dirs[:3]), RecordingLoader(), memory_budget_bytes=8,
                       size_of=lambda t: sizes[t.name])
    try:
        pool.score([("t0", [1, 2]), ("t1", [1, 2])])
        assert pool.resident_names() == ["t0", "t1"]  # 3 + 3 <= 8
        pool.score([("t2", [1, 2])])
        assert pool.resident_names() == ["t1", "t2"]  # 3 + 5 = 8: evicting t0 was enough
    finally:
        pool.close()
    with pytest.raises(PoolBudgetError, match="'t2' takes"):
        TeacherPool(teachers_of(teacher_dirs[:3]), RecordingLoader(), memory_budget_bytes=4,
                    size_of=lambda t: sizes[t.name])
    assert checkpoint_bytes(teacher_dirs[0]) == (teacher_dirs[0] / "model.safetensors").stat().st_size > 0


def test_unknown_teacher_name_is_an_error(teacher_dirs):
    pool = TeacherPool(teachers_of(teacher_dirs[:1]), RecordingLoader())
    with pytest.raises(KeyError, match="unknown teacher 'nope'"):
        pool.score([("nope", [1, 2])])


# -- the tokenizer check -------------------------------------------------------------------------


def test_tokenizer_check(tmp_path, teacher_dirs):
    student = teacher_dirs[0]
    check_same_tokenizer(student, teachers_of(teacher_dirs[1:]))  # same tokenizer: fine
    other_order = make_tiny_model(tmp_path / "perm", words=list(reversed(WORDS)), hidden_size=16, num_layers=1,
                                  num_heads=2, num_kv_heads=1, intermediate_size=32, max_position_embeddings=64)
    with pytest.raises(ConfigError, match=r"distill.teachers \('bad'\): its tokenizer differs .* in \d+ tokens"):
        check_same_tokenizer(student, [TeacherConfig(name="bad", path=str(other_order), domains=["d"])])
    bigger = make_tiny_model(tmp_path / "big", words=WORDS + ["extra"], hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, intermediate_size=32, max_position_embeddings=64)
    with pytest.raises(ConfigError, match=r"\('big'\): its embedding has \d+ rows and the student's"):
        check_same_tokenizer(student, [TeacherConfig(name="big", path=str(bigger), domains=["d"])])
    with pytest.raises(ConfigError, match=r"\('gone'\): path .* is not an HF checkpoint directory"):
        check_same_tokenizer(student, [TeacherConfig(name="gone", path=str(tmp_path / "nope"), domains=["d"])])


# -- start-up errors through the CLI (exit 2, one paragraph, no traceback) -----------------------


def _config(tmp_path: Path, student: Path, teachers: str, tasks: list[dict], extra: str = "") -> Path:
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"run: {{output_dir: {tmp_path / 'runs'}}}\nmodel: {{path: {student}}}\n"
                   f"env: {{name: relayrl.opd.env:PromptEnv, tasks: {task_file}}}\nrollout: {{parser: plain}}\n"
                   f"logging: {{wandb: disabled, progress: false}}\ndistill:\n  teachers: {teachers}\n{extra}")
    return cfg


TASKS = [{"id": "a", "prompt": "topic d0 q0", "domain": "d0"}, {"id": "b", "prompt": "topic d1 q1", "domain": "d1"}]


@pytest.mark.parametrize("command", ["distill", "eval"])
def test_cli_start_up_errors(tmp_path, capsys, teacher_dirs, command):
    student = teacher_dirs[0]
    one = f"[{{name: t0, path: {teacher_dirs[0]}, domains: [d0]}}]"
    two = f"[{{name: t0, path: {teacher_dirs[0]}, domains: [d0]}}, {{name: t1, path: {teacher_dirs[1]}, domains: [d1]}}]"
    cases = [
        ("[]", TASKS, "", "distill.teachers: no teachers configured"),
        (one, TASKS, "", "have domains no teacher owns: 'd1'"),
        (f"[{{name: t0, path: {tmp_path / 'missing'}, domains: [d0, d1]}}]", TASKS, "",
         "distill.teachers ('t0'): path"),
        (two, TASKS, "  fallback_teacher: t9\n", "distill.fallback_teacher: 't9' is not a teacher"),
    ]
    if command == "distill":
        cases.append((two, TASKS, "  pool_memory_gb: 1.0e-9\n", "distill.pool_memory_gb: teacher 't0' takes"))
    for teachers, tasks, extra, expected in cases:
        cfg = _config(tmp_path, student, teachers, tasks, extra)
        # The distillation report is `relayrl eval --distill` (plain `eval` of a config without
        # teachers is the agent-loop evaluation).
        assert main([command, str(cfg), *(["--distill"] if command == "eval" else [])]) == 2
        err = capsys.readouterr().err
        assert expected in err, err
        assert "Traceback" not in err
