"""Function-level Python tasks at scale, for the coding env (schema in ``envs/tasks/README.md``).

A *family* is a template of one small function ("sum the integers of xs that are divisible by
k", "shift every lowercase letter k places"); drawing its parameters (k, an operator, a
separator, ...) gives a task. Each task is one workspace file ``solution.py`` holding a stub
(signature, docstring with examples, ``raise NotImplementedError``), visible tests with the
examples, hidden tests of separate test functions (examples, edge cases, random inputs), and
the reference ``solution.py``. Hidden-test expectations are the reference's outputs, computed
here by running it, so a task cannot disagree with its own reference.

How a task is made (``_make``):

    params   drawn from the family's random stream (seeded by the generation seed and family)
    cases    test inputs drawn from a stream seeded by (family, params) only, so equal
             parameters give equal tests whatever the seed
    keep     only if the family's plausible *wrong* solution (an off-by-one, a missed edge
             case, a wrong operator) fails at least one hidden test, and the hidden tests
             (function name normalised) are not those of a task already kept

The dedup key of a task is a hash of (family, params). A task belongs to the held-out split
when that hash falls in a fixed 14% bucket, so a task's split depends on what it asks, not on
the seed, the order of generation or how many tasks were asked for: train tasks of any seed
never ask what a held-out task asks. ``generate_tasks(split, seed, n)`` returns the first n
tasks of the split in a seeded shuffled order; ``task_set("pyfunc:heldout:50")`` resolves
the task-set names that ``env.tasks`` accepts (always seed 0, so held-out never changes with
the run's seed).

Nothing here is copied from a public benchmark's problems: the families are invented (see the
README's rule on held-out and benchmark data).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

SPLITS = ("train", "heldout")
HELDOUT_PER_MILLE = 140
"""A task is held out when its dedup key's hash mod 1000 is below this."""
PER_FAMILY = 60
"""Tasks drawn per family and seed (fewer when the family has fewer distinct parameter sets)."""
DRAWS_PER_FAMILY = 600
CODE_FILE = "solution.py"
TASK_SET_PREFIX = "pyfunc"

Split = Literal["train", "heldout"]


# ---------------------------------------------------------------------------------------------
# The machinery: a family draws parameters and returns a Spec; _make renders and checks it.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One task's function, as a family describes it.

    ``doc`` is the behaviour in plain words, edge cases included (it is the docstring and the
    instruction); ``body``/``wrong`` are the reference and the plausible wrong function bodies
    (unindented); ``cases`` are argument tuples, the first ``examples`` of them shown.
    """

    args: str
    returns: str
    doc: str
    body: str
    wrong: str
    cases: tuple[tuple[Any, ...], ...]
    examples: int = 2


class Draw:
    """The parameters of one task, drawn from the family's stream and recorded.

    ``cases`` is a second stream seeded by the family and the parameters drawn so far; once
    it is used no more parameters may be drawn, so the tests are a function of the parameters.
    """

    def __init__(self, family: str, rng: random.Random, seen: set[str] | frozenset[str] = frozenset()) -> None:
        self.family = family
        self._rng = rng
        self._seen = seen
        self.params: dict[str, Any] = {}
        self.fn = ""
        self._cases: random.Random | None = None

    def pick(self, key: str, options: Sequence[Any]) -> Any:
        assert self._cases is None, "parameters are drawn before the test inputs"
        assert key not in self.params, key
        value = options[self._rng.randrange(len(options))]
        self.params[key] = value
        return value

    def int(self, key: str, lo: int, hi: int) -> int:
        return self.pick(key, range(lo, hi + 1))

    def name(self, *options: str) -> str:
        """The function's name: cosmetic, so not a parameter (equal parameters under another
        name are the same task)."""
        self.fn = options[self._rng.randrange(len(options))]
        return self.fn

    @property
    def key(self) -> str:
        """The dedup key: a hash of (family, parameters)."""
        return hashlib.sha256(f"{self.family}\x1f{_canonical(self.params)}".encode()).hexdigest()

    @property
    def cases(self) -> random.Random:
        if self._cases is None:
            if self.key in self._seen:
                raise _Seen  # skip building the inputs of a task already made
            self._cases = random.Random(_seed("cases", self.family, _canonical(self.params)))
        return self._cases


class _Seen(Exception):
    pass


class _Replay(Draw):
    """A Draw that takes given parameters instead of drawing them (``build_task``)."""

    def __init__(self, family: str, params: dict[str, Any], fn: str | None) -> None:
        super().__init__(family, random.Random(0))
        self._given = params
        self._fn = fn

    def pick(self, key: str, options: Sequence[Any]) -> Any:
        if key not in self._given:
            raise ValueError(f"{self.family}: parameter {key!r} is missing")
        wanted = json.dumps(self._given[key])  # a tuple given as a list (from JSON) matches too
        for option in options:
            if json.dumps(option) == wanted:
                self.params[key] = option
                return option
        raise ValueError(f"{self.family}: {key}={self._given[key]!r} is not one of {list(options)}")

    def name(self, *options: str) -> str:
        self.fn = self._fn or options[0]
        return self.fn


FamilyFn = Callable[[Draw], Spec]
FAMILIES: dict[str, FamilyFn] = {}


def family(name: str) -> Callable[[FamilyFn], FamilyFn]:
    def register(fn: FamilyFn) -> FamilyFn:
        assert name not in FAMILIES, name
        FAMILIES[name] = fn
        return fn
    return register


@dataclass(frozen=True)
class GeneratedTask:
    """A task and what only the generator knows about it: its family's wrong solution, its
    dedup key and parameters. ``task()`` is the schema dict (a fresh one each call)."""

    id: str
    family: str
    key: str
    params: str
    instruction: str
    stub: str
    visible: str
    hidden: str
    reference: str
    wrong: str

    def task(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instruction": self.instruction,
            "files": [{"path": CODE_FILE, "content": self.stub}],
            "visible_tests": [{"path": "tests/test_solution.py", "content": self.visible}],
            "hidden_tests": [{"path": "test_hidden.py", "content": self.hidden}],
            "solution": [{"path": CODE_FILE, "content": self.reference}],
            "domain": "python",
            "family": self.family,
            "code_file": CODE_FILE,
        }


def _seed(*parts: Any) -> int:
    """A 64-bit seed from text: stable across runs and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def split_of(key: str) -> Split:
    """The split of a task with this dedup key (a hex digest)."""
    return "heldout" if int(key[:8], 16) % 1000 < HELDOUT_PER_MILLE else "train"


def _function_source(fn: str, spec: Spec, body: str, shown: list[tuple[str, str]]) -> str:
    doc = _wrapped(spec.doc)
    examples = "".join(f"\n    >>> {fn}({a})\n    {e}" for a, e in shown)
    code = textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")
    return f'def {fn}({spec.args}) -> {spec.returns}:\n    """{doc}\n{examples}\n    """\n{code}\n'


@functools.lru_cache(maxsize=4096)
def _wrapped(doc: str) -> str:
    """The docstring's text, wrapped and indented (the first line without its indent)."""
    return "\n    ".join(textwrap.wrap(doc, 88))


def _call_all(source: str, fn: str, cases: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """Each case's result, or the exception it raised (an exception never equals a result)."""
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<taskgen {fn}>", "exec"), namespace)
    f = namespace[fn]
    results: list[Any] = []
    for case in cases:
        try:
            results.append(f(*copy.deepcopy(case)))
        except Exception as e:  # a wrong solution may crash on an edge case: that is a failure
            results.append(e)
    return results


def _literal(value: Any) -> str:
    """``repr`` of a test value; only types whose repr reads back equal (no floats, no objects)."""
    def ok(v: Any) -> bool:
        if isinstance(v, (bool, int, str, type(None))):
            return True
        if isinstance(v, (list, tuple)):
            return all(ok(x) for x in v)
        if isinstance(v, dict):
            return all(ok(k) and ok(x) for k, x in v.items())
        return False

    if not ok(value):
        raise TypeError(f"not a plain literal: {value!r}")
    return repr(value)


def _hidden_tests(fn: str, calls: list[tuple[str, str]]) -> str:
    tests = "".join(f"\n\ndef test_case_{i}():\n    assert {fn}({a}) == {e}\n" for i, (a, e) in enumerate(calls, 1))
    return f"from solution import {fn}\n{tests}"


def _make(name: str, d: Draw, spec: Spec) -> tuple[GeneratedTask, str] | None:
    """Render a drawn task and check it; None when the wrong solution passes every case.

    Returns the task and the hash of its hidden tests with the function name normalised.
    """
    fn = d.fn
    assert fn and re.fullmatch(r"[a-z_][a-z0-9_]*", fn), (name, fn)
    assert 1 <= spec.examples < len(spec.cases), name
    bare = _function_source(fn, spec, spec.body, [])
    expected = _call_all(bare, fn, spec.cases)
    for value in expected:
        if isinstance(value, Exception):
            raise AssertionError(f"{name} {d.params}: the reference raised {value!r}")
    wrong_results = _call_all(_function_source(fn, spec, spec.wrong, []), fn, spec.cases)
    if all(type(w) is type(e) and w == e for w, e in zip(wrong_results, expected, strict=True)):
        return None
    calls = [(", ".join(_literal(a) for a in case), _literal(e)) for case, e in zip(spec.cases, expected, strict=True)]
    shown = calls[:spec.examples]
    stub = _function_source(fn, spec, "raise NotImplementedError", shown)
    reference = _function_source(fn, spec, spec.body, shown)
    wrong = _function_source(fn, spec, spec.wrong, shown)
    assert "\\" not in stub, (name, "no backslashes in docstrings")
    hidden = _hidden_tests(fn, calls)
    visible = f"from solution import {fn}\n\n\ndef test_examples():\n" + "".join(
        f"    assert {fn}({a}) == {e}\n" for a, e in shown)
    argnames = ", ".join(re.findall(r"(\w+):", spec.args))
    instruction = (
        f"Implement `{fn}({argnames})` in {CODE_FILE}; it is imported as `from solution import {fn}`.\n\n"
        f"    def {fn}({spec.args}) -> {spec.returns}\n\n{spec.doc}\n\nExamples:\n"
        + "".join(f"    {fn}({a}) == {e}\n" for a, e in shown))
    normalised = hashlib.sha256(_hidden_tests("f", calls).encode()).hexdigest()
    content = json.dumps([instruction, stub, visible, hidden, reference])
    task_id = f"gen-{name}-{hashlib.sha256(content.encode()).hexdigest()[:8]}"
    return GeneratedTask(id=task_id, family=name, key=d.key, params=_canonical(d.params), instruction=instruction,
                         stub=stub, visible=visible, hidden=hidden, reference=reference, wrong=wrong), normalised


@functools.lru_cache(maxsize=4)
def _pool(seed: int) -> tuple[GeneratedTask, ...]:
    """Every task of both splits for this seed, family by family (cached: tasks are immutable)."""
    pool: list[GeneratedTask] = []
    seen_keys: set[str] = set()
    seen_tests: set[str] = set()
    for name, make_spec in FAMILIES.items():
        rng = random.Random(_seed("params", seed, name))
        kept = 0
        for _ in range(DRAWS_PER_FAMILY):
            if kept == PER_FAMILY:
                break
            d = Draw(name, rng, seen_keys)
            try:
                spec = make_spec(d)
            except _Seen:
                continue
            if d.key in seen_keys:  # a family that drew no test inputs (cannot happen today)
                continue
            seen_keys.add(d.key)
            made = _make(name, d, spec)
            if made is None or made[1] in seen_tests:
                continue
            seen_tests.add(made[1])
            pool.append(made[0])
            kept += 1
    return tuple(pool)


def build_task(family_name: str, params: dict[str, Any], fn: str | None = None) -> GeneratedTask:
    """The task of a family with the given parameters (as in ``GeneratedTask.params``); the
    function is named ``fn`` or the family's first name for them."""
    if family_name not in FAMILIES:
        raise ValueError(f"no family {family_name!r}; the families are {', '.join(FAMILIES)}")
    d = _Replay(family_name, params, fn)
    spec = FAMILIES[family_name](d)
    unused = sorted(set(params) - set(d.params))
    if unused:
        raise ValueError(f"{family_name}: parameter(s) {', '.join(unused)} not used with these values")
    made = _make(family_name, d, spec)
    if made is None:
        raise ValueError(f"{family_name} {params}: the wrong solution passes every hidden test")
    return made[0]


def generate(split: Split, seed: int = 0, n: int | None = None) -> list[GeneratedTask]:
    """The split's tasks with their wrong solutions and keys (see ``generate_tasks``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    tasks = sorted((t for t in _pool(seed) if split_of(t.key) == split), key=lambda t: t.key)
    random.Random(_seed("order", seed, split)).shuffle(tasks)
    if n is not None:
        if not 0 <= n <= len(tasks):
            raise ValueError(f"the {split} split of seed {seed} has {len(tasks)} tasks; {n} were asked for")
        tasks = tasks[:n]
    return tasks


def generate_tasks(split: Split, seed: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` tasks (all when None) of a split, in the coding env's task schema.

    Deterministic in (split, seed, n); a prefix of the same order for every n. The splits
    never share a dedup key, whatever the seeds.
    """
    return [t.task() for t in generate(split, seed, n)]


def task_set(name: str) -> list[dict[str, Any]] | None:
    """The tasks of a task-set name: ``pyfunc:train``, ``pyfunc:heldout``, optionally with a
    count (``pyfunc:heldout:50`` = its first 50). None when ``name`` is not such a name (a file
    path); ValueError when it starts with ``pyfunc:`` but is not a valid one. Always seed 0."""
    head, sep, rest = name.partition(":")
    if head != TASK_SET_PREFIX or not sep:
        return None
    valid = "pyfunc:train or pyfunc:heldout, optionally with a count (pyfunc:heldout:50)"
    match = re.fullmatch(r"(train|heldout)(?::([0-9]+))?", rest)
    if match is None or match[2] is not None and int(match[2]) == 0:
        raise ValueError(f"{name!r} is not a task set: the generated task sets are {valid}")
    split, count = match[1], match[2]
    return generate_tasks(split, seed=0, n=None if count is None else int(count))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "moon", "sun", "bread", "green", "quiet",
         "open", "mango", "pixel", "rocket", "sand", "tree", "wolf", "zebra", "ice", "echo", "oak",
         "yarn", "kite", "owl", "plum", "frog", "gate", "hill", "nest", "bell", "dust", "fern", "grape",
         "jam", "leaf", "mint", "nut", "pearl", "rope", "salt", "vine", "wave", "bee", "cat", "dog", "ant",
         "sky", "map", "cup", "a", "an", "to", "is", "go", "blue", "pencil", "garden", "window", "rainbow",
         "kitchen", "blanket", "lantern", "elephant", "mountain", "keyboard", "umbrella", "butterfly")
NAMES = ("ada", "ben", "cleo", "dan", "eve", "finn", "gus", "hana", "ivo", "jade", "kai", "lena", "max",
         "nora", "omar", "pia")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _ints(r: random.Random, lo: int, hi: int, n_lo: int = 3, n_hi: int = 8) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(n_lo, n_hi))]


def _words(r: random.Random, n_lo: int = 2, n_hi: int = 6) -> list[str]:
    return [r.choice(WORDS) for _ in range(r.randint(n_lo, n_hi))]


def _mixed_case(r: random.Random, word: str) -> str:
    return "".join(ch.upper() if r.random() < 0.35 else ch for ch in word)


def _text(r: random.Random, extra: str = "", n_lo: int = 2, n_hi: int = 5) -> str:
    """Words with some capitals, digits and punctuation, plus ``extra``'s characters."""
    parts = [_mixed_case(r, w) for w in _words(r, n_lo, n_hi)]
    parts += [r.choice("0123456789") * r.randint(1, 2), r.choice(".,;:!?-")]
    parts += list(extra)
    r.shuffle(parts)
    return " ".join(parts)


def _sep_name(sep: str) -> str:
    return {" ": "single spaces", ",": "commas", "-": "hyphens", ";": "semicolons", "|": "'|' characters",
            "_": "underscores", ".": "dots", "/": "slashes", ":": "colons", "&": "'&' characters"}[sep]


def _cmp_text(op: str, t: Any) -> str:
    return {">": f"greater than {t}", "<": f"less than {t}", ">=": f"at least {t}", "<=": f"at most {t}",
            "==": f"equal to {t}"}[op]


OFF_BY_ONE = {">": ">=", "<": "<=", ">=": ">", "<=": "<", "==": ">="}
"""The comparison a hurried programmer writes instead."""


def _cases(*cases: Any) -> tuple[tuple[Any, ...], ...]:
    """One-argument cases written as plain values."""
    return tuple((c,) for c in cases)


# ---------------------------------------------------------------------------------------------
# The families. Each draws its parameters, names the function, and returns the Spec: doc,
# reference body, a plausible wrong body, and cases (examples first, then edge cases and
# random inputs chosen so that the wrong body fails at least one).
# ---------------------------------------------------------------------------------------------

@family("filter_aggregate")
def _filter_aggregate(d: Draw) -> Spec:
    pred = d.pick("pred", ("even", "odd", "multiple", ">", "<", ">="))
    agg = d.pick("agg", ("sum", "count"))
    if pred in ("even", "odd", "multiple"):
        k = d.int("k", 3, 9) if pred == "multiple" else 2
        rem = int(pred == "odd")
        cond, wrong = f"x % {k} == {rem}", f"x % {k} == {rem} and x > 0"
        text = {"even": "even", "odd": "odd", "multiple": f"divisible by {k}"}[pred] + \
            " (zero and negative numbers count too)"
        tag = {"even": "even", "odd": "odd", "multiple": "multiples"}[pred]
        lo, hi = -12, 15
        boundary = [-2 * k, -k - 1, -k + rem, 0, 1, k, 3 * k + rem]
    else:
        t = d.int("t", -5, 20)
        cond, wrong, text = f"x {pred} {t}", f"x {OFF_BY_ONE[pred]} {t}", _cmp_text(pred, t)
        tag = {">": "above", "<": "below", ">=": "at_least"}[pred]
        lo, hi = t - 8, t + 8
        boundary = [t - 1, t, t + 1, t + 2, t]
    if agg == "sum":
        d.name(f"sum_{tag}", f"total_{tag}")
        doc = f"Return the sum of the integers in xs that are {text}; 0 if there are none (also for an empty list)."
        body, wrong_body = f"return sum(x for x in xs if {cond})", f"return sum(x for x in xs if {wrong})"
    else:
        d.name(f"count_{tag}", f"num_{tag}")
        doc = f"Return how many integers in xs are {text}; 0 for an empty list."
        body, wrong_body = f"return sum(1 for x in xs if {cond})", f"return sum(1 for x in xs if {wrong})"
    r = d.cases
    cases = [_ints(r, lo, hi, 5, 5), [], boundary] + [_ints(r, lo, hi) for _ in range(4)]
    return Spec("xs: list[int]", "int", doc, body, wrong_body, _cases(*cases))


@family("linear_map")
def _linear_map(d: Draw) -> Spec:
    a = d.pick("a", (-3, -2, 2, 3, 4, 5))
    b = d.pick("b", tuple(v for v in range(-9, 10) if v))
    sign = "+" if b > 0 else "-"
    expr = f"{a} * x {sign} {abs(b)}"
    d.name("transform", "apply_formula", "linear_map", "rescale_all")
    doc = (f"Return a new list in which every integer x of xs is replaced by {expr} (multiply first, "
           f"then {'add' if b > 0 else 'subtract'} {abs(b)}); an empty list gives an empty list.")
    r = d.cases
    cases = [[1, 2, 3], [], [0], [-4, 7]] + [_ints(r, -20, 20) for _ in range(3)]
    return Spec("xs: list[int]", "list[int]", doc, f"return [{expr} for x in xs]",
                f"return [{a} * (x {sign} {abs(b)}) for x in xs]", _cases(*cases))


@family("clamp_values")
def _clamp_values(d: Draw) -> Spec:
    lo = d.int("lo", -10, 5)
    hi = lo + d.int("width", 2, 15)
    d.name("clamp_all", "clip_values", "limit_values", "bound_values")
    doc = (f"Return a new list in which every value of xs is clamped to the range [{lo}, {hi}]: values below "
           f"{lo} become {lo}, values above {hi} become {hi}, the others stay as they are.")
    r = d.cases
    cases = [[lo - 3, lo + 1, hi + 4], [], [lo, hi], [lo - 1, hi + 1]] + \
        [_ints(r, lo - 10, hi + 10) for _ in range(3)]
    return Spec("xs: list[int]", "list[int]", doc, f"return [min(max(x, {lo}), {hi}) for x in xs]",
                f"return [min(x, {hi}) for x in xs]", _cases(*cases))


@family("count_chars")
def _count_chars(d: Draw) -> Spec:
    kind = d.pick("kind", ("vowels", "digits", "upper", "letter", "exact", "marks"))
    extra = ""
    if kind == "vowels":
        d.name("count_vowels", "vowel_count")
        text, cond, wrong = "vowels (a, e, i, o, u, in upper or lower case)", 'ch.lower() in "aeiou"', 'ch in "aeiou"'
        extra = "AEeIo"
    elif kind == "digits":
        d.name("count_digits", "digit_count")
        text, cond, wrong = "digit characters 0-9", 'ch in "0123456789"', 'ch in "123456789"'
        extra = "070"
    elif kind == "upper":
        d.name("count_upper", "count_capitals")
        text, cond, wrong = "uppercase letters A-Z", '"A" <= ch <= "Z"', "ch == ch.upper()"
        extra = "Q7!"
    elif kind in ("letter", "exact"):
        c = d.pick("c", LETTERS)
        d.name("count_letter", "letter_count", f"count_{c}")
        if kind == "letter":
            text = f"letters '{c}', in either case ('{c}' or '{c.upper()}')"
            cond, wrong = f'ch.lower() == "{c}"', f'ch == "{c}"'
        else:
            text = f"lowercase letters '{c}' ('{c.upper()}' does not count)"
            cond, wrong = f'ch == "{c}"', f'ch.lower() == "{c}"'
        extra = c + c.upper() + c
    else:
        marks = "".join(d.pick("marks", tuple(f"{a}{b}{c}" for a in ".,;" for b in ":!?" for c in "-+=")))
        d.name("count_marks", "count_symbols")
        text = "characters that are one of " + ", ".join(f"'{m}'" for m in marks)
        cond, wrong = f'ch in "{marks}"', ""
        extra = marks + marks[-1] + marks[0]
    doc = f"Return how many characters of the string s are {text}; 0 for an empty string."
    r = d.cases
    cases = [_text(r, extra[:2], 2, 2), "", extra] + [_text(r, extra) for _ in range(4)]
    wrong_body = f"return sum(1 for ch in s if {wrong})" if wrong else f'return s.count("{marks}")'
    return Spec("s: str", "int", doc, f"return sum(1 for ch in s if {cond})", wrong_body, _cases(*cases))


@family("word_transform")
def _word_transform(d: Draw) -> Spec:
    op = d.pick("op", ("reverse_each", "reverse_order", "capitalize", "sort", "unique", "swap_ends"))
    sep = d.pick("sep", (" ", ",", "-", ";", "|"))
    s = repr(sep)
    words = f"s.split({s})"
    if op == "reverse_each":
        d.name("reverse_each_word", "flip_words")
        what = "the letters of each word reversed, the words staying in place"
        body, wrong = f"return {s}.join(w[::-1] for w in {words})", "return s[::-1]"
    elif op == "reverse_order":
        d.name("reverse_word_order", "words_backwards")
        what = "its words in reverse order (each word itself unchanged)"
        body, wrong = f"return {s}.join({words}[::-1])", "return s[::-1]"
    elif op == "capitalize":
        d.name("capitalize_words", "title_words")
        what = "every word capitalised: its first character in upper case and the rest in lower case"
        body = f"return {s}.join(w[:1].upper() + w[1:].lower() for w in {words})"
        wrong = f"return {s}.join(w[:1].upper() + w[1:] for w in {words})"
    elif op == "sort":
        d.name("sort_words", "alphabetize")
        what = "its words sorted in alphabetical order (plain string comparison)"
        body, wrong = f"return {s}.join(sorted({words}))", f"return {s}.join(sorted({words}, key=len))"
    elif op == "unique":
        d.name("unique_words", "drop_repeated_words")
        what = "only the first occurrence of each word, in their original order"
        body = f"kept = []\nfor w in {words}:\n    if w not in kept:\n        kept.append(w)\nreturn {s}.join(kept)"
        wrong = f"return {s}.join(sorted(set({words})))"
    else:
        d.name("swap_ends", "swap_first_last")
        what = "its first and last words swapped (a single word stays as it is)"
        body = f"words = {words}\nwords[0], words[-1] = words[-1], words[0]\nreturn {s}.join(words)"
        wrong = f"words = {words}\nreturn {s}.join([words[-1]] + words[1:-1] + [words[0]])"
    doc = (f"The string s holds words separated by {_sep_name(sep)}. Return s with {what}, "
           f"separated the same way. An empty string gives an empty string.")
    r = d.cases

    def sentence(n_lo: int, n_hi: int) -> str:
        ws = _words(r, n_lo, n_hi)
        if op == "capitalize":
            ws = [_mixed_case(r, w) for w in ws]
        if op == "unique":
            ws += r.sample(ws, min(2, len(ws)))
            r.shuffle(ws)
        return sep.join(ws)

    cases = [sentence(3, 3), "", r.choice(WORDS) if op != "capitalize" else "hELLO"] + \
        [sentence(2, 6) for _ in range(4)]
    return Spec("s: str", "str", doc, body, wrong, _cases(*cases))


@family("words_by_length")
def _words_by_length(d: Draw) -> Spec:
    op = d.pick("op", (">", "<", "==", ">="))
    k = d.int("k", 2, 7)
    out = d.pick("out", ("list", "count"))
    text = {">": f"longer than {k} characters", "<": f"shorter than {k} characters",
            "==": f"exactly {k} characters long", ">=": f"at least {k} characters long"}[op]
    tag = {">": "long_words", "<": "short_words", "==": "words_of_length", ">=": "words_at_least"}[op]
    cond, wrong = f"len(w) {op} {k}", f"len(w) {OFF_BY_ONE[op]} {k}"
    if out == "list":
        d.name(tag, f"pick_{tag}")
        doc = (f"Split the string s on whitespace and return the list of its words that are {text}, in their "
               f"original order (an empty list when there are none).")
        body, wrong_body = f"return [w for w in s.split() if {cond}]", f"return [w for w in s.split() if {wrong}]"
        returns = "list[str]"
    else:
        d.name(f"count_{tag}", f"num_{tag}")
        doc = f"Split the string s on whitespace and return how many of its words are {text}."
        body, wrong_body = f"return sum(1 for w in s.split() if {cond})", f"return sum(1 for w in s.split() if {wrong})"
        returns = "int"
    r = d.cases
    near = [w for w in WORDS if abs(len(w) - k) <= 1]
    cases = ["  ".join(r.sample(near, 3)), "", " ".join(r.sample(near, 4))] + \
        [" ".join(_words(r, 3, 7) + r.sample(near, 2)) for _ in range(4)]
    return Spec("s: str", returns, doc, body, wrong_body, _cases(*cases))


@family("sequence_term")
def _sequence_term(d: Draw) -> Spec:
    kind = d.pick("kind", ("arithmetic", "arithmetic", "arithmetic", "geometric", "multiples", "fibonacci"))
    ns = [1, 4, 2, 3, 7, 10]
    if kind == "arithmetic":
        a, step = d.int("a", -5, 10), d.pick("d", tuple(v for v in range(-3, 10) if v))
        d.name("nth_term", "term_at", "sequence_value")
        doc = (f"Return the n-th term (n >= 1) of the sequence that starts at {a} and changes by {step} at each "
               f"step: the first terms are {a}, {a + step}, {a + 2 * step}, ...")
        factor = f"({step})" if step < 0 else str(step)
        body, wrong = f"return {a} + (n - 1) * {factor}", f"return {a} + n * {factor}"
    elif kind == "geometric":
        a, q = d.int("a", 1, 5), d.int("q", 2, 4)
        d.name("nth_power_term", "geometric_term")
        doc = (f"Return the n-th term (n >= 1) of the sequence that starts at {a} and is multiplied by {q} at "
               f"each step: the first terms are {a}, {a * q}, {a * q * q}, ...")
        body, wrong = f"return {a} * {q} ** (n - 1)", f"return {a} * {q} ** n"
    elif kind == "multiples":
        k = d.int("k", 1, 12)
        d.name("triangular" if k == 1 else "sum_of_multiples", "sum_first_multiples")
        doc = (f"Return the sum of the first n positive multiples of {k}: {k} + {2 * k} + ... + n * {k} "
               f"(0 when n is 0).")
        body, wrong = f"return {k} * n * (n + 1) // 2", f"return {k} * n * (n - 1) // 2"
        ns.insert(3, 0)
    else:
        a, b = d.int("a", 0, 4), d.int("b", 1, 5)
        d.name("nth_fib", "fib_like")
        doc = (f"The sequence f starts with f(1) = {a} and f(2) = {b}; every later term is the sum of the two "
               f"before it. Return f(n) for n >= 1.")
        body = f"x, y = {a}, {b}\nfor _ in range(n - 1):\n    x, y = y, x + y\nreturn x"
        wrong = f"x, y = {a}, {b}\nfor _ in range(n):\n    x, y = y, x + y\nreturn x"
    return Spec("n: int", "int", doc, body, wrong, _cases(*ns))


@family("digits")
def _digits(d: Draw) -> Spec:
    kind = d.pick("kind", ("sum", "count", "greater", "largest"))
    if kind == "sum":
        b = d.int("base", 2, 10)
        d.name("digit_sum", "sum_of_digits")
        doc = f"Return the sum of the digits of the non-negative integer n written in base {b} (0 for n = 0)."
        body = f"total = 0\nwhile n > 0:\n    total += n % {b}\n    n //= {b}\nreturn total"
        wrong = f"total = 0\nwhile n >= {b}:\n    total += n % {b}\n    n //= {b}\nreturn total"
    elif kind == "count":
        b = d.int("base", 2, 10)
        d.name("digit_count", "num_digits")
        doc = (f"Return how many digits the non-negative integer n has when written in base {b} "
               f"(0 is written with one digit).")
        body = f"count = 1\nwhile n >= {b}:\n    n //= {b}\n    count += 1\nreturn count"
        wrong = f"count = 0\nwhile n > 0:\n    n //= {b}\n    count += 1\nreturn count"
    elif kind == "greater":
        t = d.int("t", 0, 8)
        d.name("count_big_digits", f"digits_above_{t}")
        doc = f"Return how many decimal digits of the non-negative integer n are greater than {t}."
        body = f"return sum(1 for ch in str(n) if int(ch) > {t})"
        wrong = f"return sum(1 for ch in str(n) if int(ch) >= {t})"
    else:
        b = d.int("base", 2, 9)
        d.name("largest_digit", "max_digit")
        doc = f"Return the largest digit of the non-negative integer n written in base {b} (0 for n = 0)."
        body = f"best = 0\nwhile n > 0:\n    best = max(best, n % {b})\n    n //= {b}\nreturn best"
        wrong = "return max(int(ch) for ch in str(n))"
    r = d.cases
    return Spec("n: int", "int", doc, body, wrong,
                _cases(r.randint(100, 999), 0, r.randint(1, 9), r.randint(10_000, 99_999), 9_876_543_210,
                       r.randint(1, 10 ** 7), 8 ** 4))


@family("range_multiples")
def _range_multiples(d: Draw) -> Spec:
    k = d.int("k", 2, 13)
    kind = d.pick("kind", ("count", "sum", "list"))
    negate = d.pick("negate", (False, True))
    cond = f"x % {k} != 0" if negate else f"x % {k} == 0"
    what = f"{'not ' if negate else ''}divisible by {k}"
    stem = "non_multiples" if negate else "multiples"
    if kind == "count":
        d.name(f"count_{stem}", f"how_many_{stem}")
        doc = f"Return how many integers from lo to hi, both included, are {what} (0 when lo > hi)."
        template, returns = "return sum(1 for x in range(lo, {end}) if {cond})", "int"
    elif kind == "sum":
        d.name(f"sum_{stem}", f"total_{stem}")
        doc = f"Return the sum of the integers from lo to hi, both included, that are {what} (0 when lo > hi)."
        template, returns = "return sum(x for x in range(lo, {end}) if {cond})", "int"
    else:
        d.name(f"list_{stem}", stem)
        doc = (f"Return the list of the integers from lo to hi, both included, that are {what}, in increasing "
               f"order (an empty list when lo > hi).")
        template, returns = "return [x for x in range(lo, {end}) if {cond}]", "list[int]"
    body, wrong = template.format(end="hi + 1", cond=cond), template.format(end="hi", cond=cond)
    r = d.cases
    hi_hit = k * r.randint(2, 5) + (1 if negate else 0)
    cases = [(1, 2 * k + 1), (5, 4), (hi_hit - 2 * k, hi_hit), (-k, k + 1), (k, k)] + \
        [(lo, lo + r.randint(0, 3 * k)) for lo in (r.randint(-20, 20), r.randint(-20, 20))]
    return Spec("lo: int, hi: int", returns, doc, body, wrong, tuple(cases))


@family("count_keys")
def _count_keys(d: Draw) -> Spec:
    kind = d.pick("kind", ("word", "first", "last", "length", "letter", "mod", "sign", "last_digit"))
    if kind in ("word", "first", "last", "length", "letter"):
        if kind == "letter":
            loop = "for ch in s.lower():\n    if not ch.isalpha():\n        continue\n    key = ch"
        else:
            key = {"word": "w.lower()", "first": "w[0].lower()", "last": "w[-1].lower()", "length": "len(w)"}[kind]
            loop = f"for w in s.split():\n    key = {key}"
        what = {"word": "each word of s (split on whitespace), lowercased,",
                "first": "the lowercased first letter of each word of s (split on whitespace)",
                "last": "the lowercased last letter of each word of s (split on whitespace)",
                "length": "the length of each word of s (split on whitespace)",
                "letter": "each letter of s, lowercased (other characters are skipped),"}[kind]
        d.name({"word": "word_counts", "first": "count_first_letters", "last": "count_last_letters",
                "length": "count_lengths", "letter": "letter_counts"}[kind], "tally")
        args = "s: str"
        returns = "dict[str, int]" if kind != "length" else "dict[int, int]"
        doc = f"Return a dict that maps {what} to the number of times it occurs (an empty dict for an empty string)."
        r = d.cases
        cases = _cases("the Cat saw the cat", "",
                       *(" ".join(_mixed_case(r, w) for w in _words(r, 4, 8)) for _ in range(5)))
    else:
        if kind == "mod":
            k = d.int("k", 2, 7)
            key, what = f"x % {k}", f"its remainder x % {k} (between 0 and {k - 1}, also for negative x)"
        elif kind == "sign":
            key = '"negative" if x < 0 else "zero" if x == 0 else "positive"'
            what = "'negative', 'zero' or 'positive' by its sign"
        else:
            key, what = "abs(x) % 10", "its last decimal digit (of abs(x))"
        loop = f"for x in xs:\n    key = {key}"
        d.name("count_by_key", "tally", "group_counts")
        args, returns = "xs: list[int]", "dict[int, int]" if kind != "sign" else "dict[str, int]"
        doc = f"Map each integer x of xs to {what}, and return a dict from each such key to how many integers have it."
        r = d.cases
        cases = _cases([3, -3, 0, 7, 7], [], *(_ints(r, -30, 30, 4, 9) for _ in range(5)))
    body = f"counts = {{}}\n{loop}\n    counts[key] = counts.get(key, 0) + 1\nreturn counts"
    # The first occurrence stored as 0, not 1.
    wrong = (f"counts = {{}}\n{loop}\n    if key in counts:\n        counts[key] += 1\n    else:\n"
             f"        counts[key] = 0\nreturn counts")
    return Spec(args, returns, doc, body, wrong, cases)


@family("group_keys")
def _group_keys(d: Draw) -> Spec:
    kind = d.pick("kind", ("first", "last", "length", "mod"))
    ordered = d.pick("order", ("original", "sorted"))
    if kind == "mod":
        k = d.int("k", 2, 6)
        args, returns, item, key = "xs: list[int]", "dict[int, list[int]]", "x", f"x % {k}"
        what = f"the integers x of xs by their remainder x % {k} (between 0 and {k - 1}, also for negative x)"
        d.name("group_by_remainder", f"group_mod_{k}")
        r = d.cases
        cases = _cases([5, -1, 2 * k, k + 1, 0], [], *(_ints(r, -25, 25, 4, 9) for _ in range(5)))
    else:
        args, item = "words: list[str]", "w"
        returns = "dict[int, list[str]]" if kind == "length" else "dict[str, list[str]]"
        key = {"first": "w[0]", "last": "w[-1]", "length": "len(w)"}[kind]
        what = "the words by their " + {"first": "first letter", "last": "last letter", "length": "length"}[kind]
        d.name(f"group_by_{kind}", "bucket_words")
        r = d.cases
        cases = _cases(["tree", "apple", "toy", "ant"], [], *(_words(r, 3, 8) for _ in range(5)))
    coll = "xs" if kind == "mod" else "words"
    order_text = "in the order they appear" if ordered == "original" else "sorted in increasing order"
    doc = (f"Group {what}: return a dict from each key to the list of the items that have it, {order_text} "
           f"(an empty dict for an empty list).")
    base = f"groups = {{}}\nfor {item} in {coll}:\n    groups.setdefault({key}, []).append({item})\n"
    tail = "return groups" if ordered == "original" else "return {key: sorted(items) for key, items in groups.items()}"
    wrong = f"groups = {{}}\nfor {item} in {coll}:\n    groups[{key}] = [{item}]\n" + tail
    return Spec(args, returns, doc, base + tail, wrong, cases)


@family("parse_pairs")
def _parse_pairs(d: Draw) -> Spec:
    sep = d.pick("sep", (";", ",", "&", "|", " "))
    kv = d.pick("kv", ("=", ":", "->"))
    repeat = d.pick("repeat", ("last", "sum"))
    d.name("parse_pairs", "parse_settings", "read_pairs")
    doc = (f"The string s holds key{kv}value pairs separated by {_sep_name(sep)}, for example "
           f"{sep.join(['a' + kv + '1', 'b' + kv + '-2'])!r}; keys are words and values are integers, with no "
           f"other spaces. Return a dict from key to integer value. "
           + ("When a key repeats, the last value wins. " if repeat == "last"
              else "When a key repeats, its values are added up. ")
           + "An empty string gives an empty dict.")
    update = "result[key] = int(value)" if repeat == "last" else "result[key] = result.get(key, 0) + int(value)"
    body = (f"result = {{}}\nif not s:\n    return result\nfor part in s.split({sep!r}):\n"
            f"    key, value = part.split({kv!r})\n    {update}\nreturn result")
    if repeat == "last":
        wrong = (f"result = {{}}\nfor part in s.split({sep!r}):\n    key, value = part.split({kv!r})\n"
                 f"    {update}\nreturn result")
    else:
        wrong = body.replace(update, "result[key] = int(value)")
    r = d.cases

    def pairs(n: int) -> str:
        keys = [r.choice(NAMES[:6]) for _ in range(n)]
        return sep.join(f"{key}{kv}{r.randint(-20, 99)}" for key in keys)

    cases = _cases(sep.join([f"x{kv}3", f"y{kv}10"]), "", f"k{kv}5", sep.join([f"a{kv}1", f"b{kv}2", f"a{kv}7"]),
                   *(pairs(r.randint(2, 6)) for _ in range(3)))
    return Spec("s: str", "dict[str, int]", doc, body, wrong, cases)


@family("parse_numbers")
def _parse_numbers(d: Draw) -> Spec:
    sep = d.pick("sep", (",", ";", "|", "/", ":"))
    agg = d.pick("agg", ("sum", "count", "max", "min"))
    empty = "0" if agg in ("sum", "count") else "None"
    d.name(*{"sum": ("sum_numbers", "total_of"), "count": ("count_numbers", "how_many_numbers"),
             "max": ("largest_number", "max_of"), "min": ("smallest_number", "min_of")}[agg])
    what = {"sum": "the sum of the integers", "count": "how many integers there are",
            "max": "the largest integer", "min": "the smallest integer"}[agg]
    doc = (f"The string s holds integers (possibly negative) separated by {_sep_name(sep)}, possibly with spaces "
           f"around them, for example {' 3' + sep + '-4 ' + sep + '10'!r}. Return {what}; an empty or blank string "
           f"gives {empty}.")
    parse = f"values = [int(p) for p in s.split({sep!r}) if p.strip()]\n"
    body = parse + {"sum": "return sum(values)", "count": "return len(values)",
                    "max": "return max(values) if values else None",
                    "min": "return min(values) if values else None"}[agg]
    as_text = f"parts = [p.strip() for p in s.split({sep!r}) if p.strip()]\n"  # compared as strings: '9' > '10'
    wrong = {"sum": f"return sum(int(p) for p in s.split({sep!r}))", "count": f"return len(s.split({sep!r}))",
             "max": as_text + "return int(max(parts)) if parts else None",
             "min": as_text + "return int(min(parts)) if parts else None"}[agg]
    r = d.cases

    def numbers(n: int) -> str:
        return sep.join(r.choice(("", " ")) + str(r.randint(-50, 120)) + r.choice(("", " ")) for _ in range(n))

    cases = _cases(sep.join(["4", " 9", "12 "]), "", "  ", sep.join(["9", "10", "-3"]), sep.join(["-5", "-40", "7"]),
                   *(numbers(r.randint(2, 7)) for _ in range(3)))
    return Spec("s: str", "int" if agg in ("sum", "count") else "int | None", doc, body, wrong, cases)


@family("sort_words")
def _sort_words(d: Draw) -> Spec:
    kind = d.pick("key", ("length", "last", "vowels", "letter"))
    c = d.pick("c", LETTERS) if kind == "letter" else ""
    if kind == "letter":
        key, what = f'w.count("{c}")', f"number of letters '{c}'"
        d.name(f"sort_by_{c}_count", "order_words")
    else:
        key, what = {"length": ("len(w)", "length"), "last": ("w[-1]", "last letter (in alphabetical order)"),
                     "vowels": ('sum(ch in "aeiou" for ch in w)', "number of vowels (a, e, i, o, u)")}[kind]
        d.name(f"sort_by_{kind}", "order_words")
    desc = d.pick("desc", (False, True))
    ties = d.pick("ties", ("original", "alphabetical"))
    rev = ", reverse=True" if desc else ""
    if ties == "original":
        body = f"return sorted(words, key=lambda w: {key}{rev})"
        wrong = f"return sorted(words, key=lambda w: {key})[::-1]" if desc else \
            f"return sorted(words, key=lambda w: ({key}, w))"
        tie_text = "keep their original order"
    else:
        body = f"return sorted(sorted(words), key=lambda w: {key}{rev})"
        wrong = f"return sorted(words, key=lambda w: {key}{rev})"
        tie_text = "are in alphabetical order"
    doc = (f"Return a new list of the lowercase words of the list words sorted by each word's {what}, in "
           f"{'decreasing' if desc else 'increasing'} order; words with equal keys {tie_text}.")
    r = d.cases
    key_of: Callable[[str], Any] = {"length": len, "last": lambda w: w[-1],
                                     "vowels": lambda w: sum(ch in "aeiou" for ch in w),
                                     "letter": lambda w: w.count(c)}[kind]
    groups: dict[Any, list[str]] = {}
    for w in WORDS:
        groups.setdefault(key_of(w), []).append(w)
    tied = sorted(max(groups.values(), key=len)[:3], reverse=True)  # equal keys, not in alphabetical order
    cases = [["pear", "fig", "kiwi", "plum"], [], ["cat"], tied + [r.choice(WORDS)]] + \
        [r.sample(WORDS, r.randint(4, 8)) for _ in range(3)]
    return Spec("words: list[str]", "list[str]", doc, body, wrong, _cases(*cases))


@family("rank_scores")
def _rank_scores(d: Draw) -> Spec:
    shape = d.pick("shape", ("dict", "pairs"))
    desc = d.pick("desc", (True, False))
    top = d.pick("top", (0, 1, 2, 3))
    minus = "-" if desc else ""
    if shape == "dict":
        args, given = "scores: dict[str, int]", "scores maps each name to a score."
        body = f"ranked = sorted(scores, key=lambda name: ({minus}scores[name], name))\n"
        wrong = f"ranked = sorted(scores, key=lambda name: {minus}scores[name])\n"
    else:
        args, given = "scores: list[tuple[str, int]]", "scores is a list of (name, score) pairs with distinct names."
        body = f"ranked = [name for name, _ in sorted(scores, key=lambda p: ({minus}p[1], p[0]))]\n"
        wrong = f"ranked = [name for name, _ in sorted(scores, key=lambda p: {minus}p[1])]\n"
    tail = f"return ranked[:{top}]" if top else "return ranked"
    if top:
        d.name(f"top_{top}", "leaders" if desc else "laggards")
    else:
        d.name("ranking", "rank_names")
    doc = (f"{given} Return the names ordered by score, {'highest' if desc else 'lowest'} first; names with "
           f"equal scores in alphabetical order." + (f" Return only the first {top} names (all of them when there "
                                                     f"are fewer)." if top > 1 else " Return a list of only the "
                                                     "first name ([] when there are no names)." if top else ""))
    r = d.cases

    def table(n: int) -> dict[str, int]:
        return {name: r.randint(1, 6) for name in r.sample(NAMES, n)}

    tables = [{"cleo": 7, "ben": 9, "ada": 7}, {}, {"max": 3, "kai": 3, "eve": 3, "ben": 1}] + \
        [table(r.randint(3, 7)) for _ in range(4)]
    cases = tables if shape == "dict" else [list(t.items()) for t in tables]
    return Spec(args, "list[str]", doc, body + tail, wrong + tail, _cases(*cases))


@family("intervals")
def _intervals(d: Draw) -> Spec:
    op = d.pick("op", ("merge_touching", "merge_overlapping", "covered_length", "covered_points", "max_overlap",
                       "gaps"))
    merge = ("merged = []\nfor start, end in sorted(intervals):\n    if merged and start {cmp} merged[-1][1]:\n"
             "        merged[-1][1] = {new_end}\n    else:\n        merged.append([start, end])\n")
    good = merge.format(cmp="<=", new_end="max(merged[-1][1], end)")
    given = "intervals is a list of (start, end) integer pairs with start <= end, in any order."
    returns = "int"
    if op.startswith("merge"):
        touching = op == "merge_touching"
        d.name("merge_intervals", "merge_ranges")
        cmp = "<=" if touching else "<"
        body = merge.format(cmp=cmp, new_end="max(merged[-1][1], end)") + "return merged"
        wrong = merge.format(cmp=cmp, new_end="end") + "return merged"
        doc = (f"{given} Merge the intervals that overlap"
               + (" or touch (like (1, 3) and (3, 5))" if touching else "; intervals that only touch (like (1, 3) and "
                  "(3, 5)) stay separate") + ". Return the merged intervals as [start, end] lists sorted by start.")
        returns = "list[list[int]]"
    elif op == "covered_length":
        d.name("covered_length", "union_length")
        body, wrong = good + "return sum(end - start for start, end in merged)", \
            "return sum(end - start for start, end in intervals)"
        doc = f"{given} Return the total length of the line covered by at least one interval (overlaps counted once)."
    elif op == "covered_points":
        d.name("covered_points", "count_covered")
        body = "return len({x for start, end in intervals for x in range(start, end + 1)})"
        wrong = "return len({x for start, end in intervals for x in range(start, end)})"
        doc = f"{given} Return how many integers lie in at least one interval (both ends included)."
    elif op == "max_overlap":
        d.name("max_overlap", "busiest_point")
        body = "return max((sum(1 for s, e in intervals if s <= p <= e) for p, _ in intervals), default=0)"
        wrong = "return max((sum(1 for s, e in intervals if s <= p < e) for p, _ in intervals), default=0)"
        doc = (f"{given} Return the largest number of intervals that share a common point (both ends included, so "
               f"(1, 3) and (3, 5) share 3); 0 for an empty list.")
    else:
        d.name("find_gaps", "uncovered_gaps")
        body = good + "return [[a[1], b[0]] for a, b in zip(merged, merged[1:])]"
        wrong = merge.format(cmp="<", new_end="max(merged[-1][1], end)") + \
            "return [[a[1], b[0]] for a, b in zip(merged, merged[1:])]"
        doc = (f"{given} Return the gaps between them as [end, start] lists, sorted: the stretches covered by no "
               f"interval, between the smallest start and the largest end. Intervals that touch (like (1, 3) and "
               f"(3, 5)) leave no gap.")
        returns = "list[list[int]]"
    r = d.cases

    def spans(n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            start = r.randint(0, 30)
            out.append((start, start + r.randint(0, 8)))
        return out

    cases = [[(1, 3), (2, 6), (8, 10)], [], [(4, 9)], [(1, 3), (3, 5), (7, 8)], [(5, 6), (0, 10), (12, 15)]] + \
        [spans(r.randint(3, 6)) for _ in range(3)]
    return Spec("intervals: list[tuple[int, int]]", returns, doc, body, wrong, _cases(*cases))


@family("grid_stats")
def _grid_stats(d: Draw) -> Spec:
    op = d.pick("op", ("column_sums", "transpose", "count_equal", "count_above", "border_sum", "best_row"))
    given = "grid is a list of rows of integers, all rows of the same length."
    returns = "int"
    extra = [[5, 0], [0, 5]]
    if op == "column_sums":
        d.name("column_sums", "sum_columns")
        body = "if not grid:\n    return []\nreturn [sum(row[j] for row in grid) for j in range(len(grid[0]))]"
        wrong = "if not grid:\n    return []\nreturn [sum(row[j] for row in grid) for j in range(len(grid))]"
        doc = f"{given} Return the list of the sums of its columns, left to right ([] for an empty grid)."
        returns = "list[int]"
    elif op == "transpose":
        d.name("transpose", "flip_grid")
        body = "return [list(column) for column in zip(*grid)]"
        wrong = "return [[grid[i][j] for i in range(len(grid))] for j in range(len(grid))]"
        doc = (f"{given} Return its transpose: a new grid whose row j is column j of grid ([] for an empty "
               f"grid).")
        returns = "list[list[int]]"
    elif op == "count_equal":
        v = d.int("v", 0, 9)
        extra = [[v, v, 1], [2, v, v]]
        d.name(f"count_{v}s", "count_value")
        body, wrong = f"return sum(row.count({v}) for row in grid)", f"return sum(1 for row in grid if {v} in row)"
        doc = f"{given} Return how many cells of grid hold the value {v}."
    elif op == "count_above":
        t = d.int("t", 0, 8)
        d.name("count_above", "count_big_cells")
        body = f"return sum(1 for row in grid for x in row if x > {t})"
        wrong = f"return sum(1 for row in grid for x in row if x >= {t})"
        doc = f"{given} Return how many cells of grid hold a value greater than {t}."
    elif op == "border_sum":
        d.name("border_sum", "edge_total")
        body = ("total = 0\nfor i, row in enumerate(grid):\n    for j, x in enumerate(row):\n"
                "        if i in (0, len(grid) - 1) or j in (0, len(row) - 1):\n            total += x\nreturn total")
        wrong = ("if not grid:\n    return 0\n"
                 "return sum(grid[0]) + sum(grid[-1]) + sum(row[0] + row[-1] for row in grid)")
        doc = (f"{given} Return the sum of the cells on its border (first or last row, first or last column), "
               f"each cell counted once; 0 for an empty grid.")
    else:
        d.name("best_row", "heaviest_row")
        body = "sums = [sum(row) for row in grid]\nreturn sums.index(max(sums))"
        wrong = "return max(range(len(grid)), key=lambda i: max(grid[i]))"
        doc = (f"{given} grid has at least one row. Return the index of the row with the largest sum (the "
               f"first such row on ties).")
    r = d.cases

    def grid(rows: int, cols: int) -> list[list[int]]:
        return [[r.randint(0, 9) for _ in range(cols)] for _ in range(rows)]

    cases = [[[1, 2, 3], [4, 5, 6]], [[7]] if op == "best_row" else [], [[1, 9, 1], [5, 5, 5], [0, 0, 2]],
             [[2], [8], [3], [8]], extra] + [grid(r.randint(1, 4), r.randint(1, 5)) for _ in range(2)]
    return Spec("grid: list[list[int]]", returns, doc, body, wrong, _cases(*cases))


OFFSETS = {4: "((-1, 0), (1, 0), (0, -1), (0, 1))",
           8: "((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))"}


@family("grid_neighbors")
def _grid_neighbors(d: Draw) -> Spec:
    mark = d.pick("mark", ("#", "X", "*", "@", "o"))
    conn = d.pick("conn", (4, 8))
    op = d.pick("op", ("neighbors", "isolated"))
    near = "up, down, left and right" if conn == 4 else "including the diagonal ones"
    given = (f"grid is a list of strings of equal length; '{mark}' marks a filled cell and '.' an empty one. "
             f"Two cells are neighbours when they touch ({conn} directions: {near}); cells outside the grid do "
             f"not exist (no wrapping around the edges).")
    inside = "0 <= {r} < len(grid) and 0 <= {c} < len(grid[0])"
    careless = "{r} < len(grid) and {c} < len(grid[0])"
    if op == "neighbors":
        d.name("count_neighbors", "filled_neighbors")
        template = (f"count = 0\nfor dr, dc in {OFFSETS[conn]}:\n    rr, cc = r + dr, c + dc\n"
                    f"    if {{inside}} and grid[rr][cc] == {mark!r}:\n        count += 1\nreturn count")
        body = template.format(inside=inside.format(r="rr", c="cc"))
        wrong = template.format(inside=careless.format(r="rr", c="cc"))
        doc = f"{given} Return how many neighbours of the cell at row r, column c are filled."
        args = "grid: list[str], r: int, c: int"
    else:
        d.name("count_isolated", "lonely_cells")
        template = (f"count = 0\nfor r in range(len(grid)):\n    for c in range(len(grid[0])):\n"
                    f"        if grid[r][c] != {mark!r}:\n            continue\n"
                    f"        if not any({{inside}} and grid[r + dr][c + dc] == {mark!r}\n"
                    f"                   for dr, dc in {OFFSETS[conn]}):\n            count += 1\nreturn count")
        body = template.format(inside=inside.format(r="r + dr", c="c + dc"))
        wrong = template.format(inside=careless.format(r="r + dr", c="c + dc"))
        doc = f"{given} Return how many filled cells have no filled neighbour."
        args = "grid: list[str]"
    r = d.cases

    def grid(rows: int, cols: int, edge: bool) -> list[str]:
        cells = [[mark if r.random() < 0.35 else "." for _ in range(cols)] for _ in range(rows)]
        if edge:  # filled far edges: a neighbour count that wraps around sees them from (0, 0)
            for row in cells:
                row[-1] = mark
            cells[-1] = [mark] * cols
            cells[0][0] = mark
        return ["".join(row) for row in cells]

    small = ["." + mark + ".", mark + mark + ".", "..."]
    grids = [small, grid(4, 5, True), grid(3, 3, True), grid(5, 4, False), grid(4, 6, True), grid(1, 5, False)]
    if op == "neighbors":
        cases = [(small, 1, 1), (small, 2, 2)] + [(g, 0, 0) for g in grids[1:3]] + \
            [(g, r.randrange(len(g)), r.randrange(len(g[0]))) for g in grids[3:]] + [(grids[4], 0, 2)]
    else:
        cases = [(g,) for g in grids] + [([mark + "." + mark],)]
    return Spec(args, "int", doc, body, wrong, tuple(cases))


@family("running")
def _running(d: Draw) -> Spec:
    op = d.pick("op", ("sum", "max", "min", "differences", "window_sum", "window_max"))
    k = d.int("k", 2, 5) if op.startswith("window") else 0
    if op == "sum":
        d.name("running_sum", "prefix_sums")
        doc = "Return the list of running sums of xs: element i is xs[0] + ... + xs[i] ([] for an empty list)."
        body = "out = []\ntotal = 0\nfor x in xs:\n    total += x\n    out.append(total)\nreturn out"
        wrong = "out = []\ntotal = 0\nfor x in xs:\n    out.append(total)\n    total += x\nreturn out"
    elif op in ("max", "min"):
        d.name(f"running_{op}", f"prefix_{op}")
        doc = (f"Return the list whose element i is the {'largest' if op == 'max' else 'smallest'} of xs[0], ..., "
               f"xs[i] ([] for an empty list).")
        body = f"out = []\nfor x in xs:\n    out.append(x if not out else {op}(out[-1], x))\nreturn out"
        wrong = f"out = []\nbest = 0\nfor x in xs:\n    best = {op}(best, x)\n    out.append(best)\nreturn out"
    elif op == "differences":
        d.name("differences", "steps_between")
        doc = ("Return the list of differences between neighbours: element i is xs[i + 1] - xs[i] (one element "
               "fewer than xs; [] when xs has fewer than two elements).")
        body, wrong = "return [b - a for a, b in zip(xs, xs[1:])]", "return [a - b for a, b in zip(xs, xs[1:])]"
    else:
        agg = "sum" if op == "window_sum" else "max"
        d.name(f"window_{agg}s", f"sliding_{agg}")
        doc = (f"Return the list of the {'sums' if agg == 'sum' else 'largest values'} of every run of {k} "
               f"consecutive elements of xs, from left to right ([] when xs has fewer than {k} elements).")
        body = f"return [{agg}(xs[i:i + {k}]) for i in range(len(xs) - {k} + 1)]"
        wrong = f"return [{agg}(xs[i:i + {k}]) for i in range(len(xs) - {k})]"
    r = d.cases
    cases = [[3, -1, 4, 1, 5], [], [7], [-4, -2, -9, -1, -6], [2, 8, 3, 9, 1, 4]] + \
        [_ints(r, -10, 10, 4, 9) for _ in range(2)]
    return Spec("xs: list[int]", "list[int]", doc, body, wrong, _cases(*cases))


@family("shift_letters")
def _shift_letters(d: Draw) -> Spec:
    k = d.int("k", 1, 25)
    back = d.pick("back", (False, True))
    both = d.pick("both", (False, True))
    sign = "-" if back else "+"
    d.name("shift_letters", "rotate_letters", "encode_shift")
    lower = f'    if "a" <= ch <= "z":\n        out.append(chr((ord(ch) - ord("a") {sign} {k}) % 26 + ord("a")))\n'
    upper = f'    elif "A" <= ch <= "Z":\n        out.append(chr((ord(ch) - ord("A") {sign} {k}) % 26 + ord("A")))\n'
    tail = '    else:\n        out.append(ch)\nreturn "".join(out)'
    body = "out = []\nfor ch in s:\n" + lower + (upper if both else "") + tail
    if both:  # capitals left alone
        wrong = "out = []\nfor ch in s:\n" + lower + tail
    else:  # no wrapping around
        wrong = ('out = []\nfor ch in s:\n    if "a" <= ch <= "z":\n'
                 f"        out.append(chr(ord(ch) {sign} {k}))\n" + tail)
    which = "letter (a-z and A-Z, keeping its case)" if both else "lowercase letter a-z"
    doc = (f"Return s with every {which} moved {k} places {'back' if back else 'forward'} in the alphabet, "
           f"wrapping around ({'from a back to z' if back else 'from z back to a'}); every other character "
           f"({'digits, spaces, punctuation' if both else 'capitals, digits, spaces, punctuation'}) stays as it is.")
    r = d.cases
    cases = _cases("abc xyz", "", "Hello, World!", "zebra AZ", *(_text(r, "az") for _ in range(3)))
    return Spec("s: str", "str", doc, body, wrong, cases)


@family("string_check")
def _string_check(d: Draw) -> Spec:
    kind = d.pick("kind", ("palindrome", "palindrome_nocase", "palindrome_letters", "distinct", "distinct_nocase",
                           "digits", "vowels", "same_ends", "nondecreasing"))
    k = d.int("k", 1, 4) if kind in ("digits", "vowels") else 0
    table = {
        "palindrome": ("is_palindrome", "s reads the same backwards, exactly ('Aa' does not)", "return s == s[::-1]",
                       "t = s.lower()\nreturn t == t[::-1]", ["Aa", "abba", "abcba", "Abba", "ab"]),
        "palindrome_nocase": ("is_palindrome", "s reads the same backwards when upper and lower case are not told "
                              "apart ('Aba' does)", "t = s.lower()\nreturn t == t[::-1]", "return s == s[::-1]",
                              ["Aba", "abc", "RaceCar", "xyzzyx", "ab"]),
        "palindrome_letters": ("is_letter_palindrome", "the letters of s, lowercased, read the same backwards (all "
                               "other characters are ignored)",
                               "t = [ch.lower() for ch in s if ch.isalpha()]\nreturn t == t[::-1]",
                               "t = s.lower()\nreturn t == t[::-1]", ["No lemon, no melon", "ab, a", "abc", "a-b-a!"]),
        "distinct": ("all_distinct", "no character occurs twice in s ('a' and 'A' are different characters)",
                     "return len(set(s)) == len(s)", "return len(set(s.lower())) == len(s)",
                     ["aA", "abca", "xyz", "Hello"]),
        "distinct_nocase": ("all_distinct", "no character occurs twice in s when upper and lower case are not told "
                            "apart ('a' and 'A' count as the same)", "t = s.lower()\nreturn len(set(t)) == len(t)",
                            "return len(set(s)) == len(s)", ["aA", "abc", "Bob", "xyzX"]),
        "digits": ("has_digits", f"s contains at least {k} digit characters (0-9)",
                   f"return sum(ch.isdigit() for ch in s) >= {k}", f"return sum(ch.isdigit() for ch in s) > {k}",
                   ["a1b2c3d4"[:2 * k], "x" + "7" * (k + 1), "no digits", "12"[:1] * (k - 1) or "z"]),
        "vowels": ("has_vowels", f"s contains at least {k} vowels (a, e, i, o, u, in either case)",
                   f'return sum(ch.lower() in "aeiou" for ch in s) >= {k}',
                   f'return sum(ch.lower() in "aeiou" for ch in s) > {k}',
                   ["Ua" * k, "xyz" + "E" * k, "rhythm", "Oa" * (k + 1)]),
        "same_ends": ("same_ends", "s is not empty and its first and last characters are the same letter when upper "
                      "and lower case are not told apart ('Anna' does)",
                      "return len(s) > 0 and s[0].lower() == s[-1].lower()", "return s[0] == s[-1]",
                      ["Anna", "abc", "x", "Tent"]),
        "nondecreasing": ("is_sorted_string", "every character of s is greater than or equal to the one before it "
                          "(by code point, so 'aab' is and 'ba' is not)",
                          "return all(a <= b for a, b in zip(s, s[1:]))", "return all(a < b for a, b in zip(s, s[1:]))",
                          ["aab", "ba", "abc", "xxyz"]),
    }
    name, cond, body, wrong, fixed = table[kind]
    d.name(name, "check_" + name.removeprefix("is_").removeprefix("has_"))
    empty = kind not in ("digits", "vowels", "same_ends")
    doc = f"Return True if {cond}, else False. The empty string gives {empty}."
    r = d.cases
    cases = [fixed[0], ""] + fixed[1:] + [_text(r, "", 1, 2), r.choice(WORDS)]
    return Spec("s: str", "bool", doc, body, wrong, _cases(*cases))


@family("dedupe")
def _dedupe(d: Draw) -> Spec:
    kind = d.pick("kind", ("first", "last", "exactly", "repeated"))
    k = d.int("k", 1, 3) if kind == "exactly" else 0
    items = d.pick("items", ("ints", "words"))
    xs, typ = ("xs", "int") if items == "ints" else ("words", "str")
    first = f"out = []\nfor x in {xs}:\n    if x not in out:\n        out.append(x)\nreturn out"
    if kind == "first":
        d.name("unique", "dedupe", "remove_duplicates")
        doc = f"Return the elements of {xs} without repeats: each value once, at the place of its first occurrence."
        body, wrong = first, f"return sorted(set({xs}))"
    elif kind == "last":
        d.name("unique_last", "keep_last")
        doc = (f"Return the elements of {xs} without repeats, keeping the last occurrence of each value: the "
               f"result is in the order of those last occurrences (e.g. [1, 2, 1] gives [2, 1]).")
        body = (f"out = []\nfor i, x in enumerate({xs}):\n    if x not in {xs}[i + 1:]:\n        out.append(x)\n"
                "return out")
        wrong = first
    else:
        test = f"== {k}" if kind == "exactly" else "> 1"
        what = {1: "exactly once", 2: "exactly twice", 3: "exactly three times"}.get(k, "more than once")
        d.name("seen_" + {0: "repeated", 1: "once", 2: "twice", 3: "thrice"}[k], "pick_by_count")
        doc = (f"Return the values that occur {what} in {xs}, each listed once, in the order of their first "
               f"occurrence.")
        template = ("out = []\nfor x in {xs}:\n    if {xs}.count(x) {test} and x not in out:\n        out.append(x)\n"
                    "return out")
        body = template.format(xs=xs, test=test)
        wrong = template.format(xs=xs, test=f">= {k}") if kind == "exactly" else \
            f"return [x for x in {xs} if {xs}.count(x) > 1]"
    doc += " An empty list gives an empty list."
    r = d.cases
    if items == "ints":
        cases = [[3, 1, 3, 2, 1, 3], [], [5, 4, 5, 4, 4], [2, 2, 2, 2, 1, 1, 1]] + \
            [_ints(r, 0, 6, 5, 10) for _ in range(3)]
    else:
        pool = ["owl", "cat", "bee", "ant", "fig"]
        cases = [["owl", "cat", "owl", "bee", "cat", "owl"], [], ["fig", "ant", "fig", "ant", "ant"],
                 ["bee", "bee", "bee", "bee", "fig", "fig", "fig"]] + \
            [[r.choice(pool) for _ in range(r.randint(5, 10))] for _ in range(3)]
    return Spec(f"{xs}: list[{typ}]", f"list[{typ}]", doc, body, wrong, _cases(*cases))


@family("chunks")
def _chunks(d: Draw) -> Spec:
    k = d.int("k", 2, 6)
    last = d.pick("last", ("keep", "drop", "pad"))
    fill = d.pick("fill", (0, -1)) if last == "pad" else None
    keep = f"return [xs[i:i + {k}] for i in range(0, len(xs), {k})]"
    drop = f"return [xs[i:i + {k}] for i in range(0, len(xs) - {k} + 1, {k})]"
    d.name("chunks", "split_into_groups", f"groups_of_{k}")
    if last == "keep":
        body, wrong, what = keep, drop, "the last chunk holds what is left and may be shorter"
    elif last == "drop":
        body, wrong, what = drop, keep, f"elements left over at the end (fewer than {k}) are dropped"
    else:
        body = (f"out = [xs[i:i + {k}] for i in range(0, len(xs), {k})]\nif out and len(out[-1]) < {k}:\n"
                f"    out[-1] = out[-1] + [{fill}] * ({k} - len(out[-1]))\nreturn out")
        wrong, what = keep, f"a shorter last chunk is padded with {fill} at its end to length {k}"
    doc = (f"Split xs into consecutive chunks of {k} elements, in order; {what}. Return the list of chunks ([] for "
           f"an empty list).")
    r = d.cases
    cases = [list(range(1, 2 * k + 2)), [], list(range(10, 10 + k)), [7] * (k - 1), list(range(3 * k + 1))] + \
        [_ints(r, -9, 9, 1, 3 * k) for _ in range(2)]
    return Spec("xs: list[int]", "list[list[int]]", doc, body, wrong, _cases(*cases))


@family("rotate")
def _rotate(d: Draw) -> Spec:
    left = d.pick("left", (True, False))
    k = d.int("k", 3, 8)
    kind = d.pick("kind", ("list", "str"))
    v, typ = ("xs", "list[int]") if kind == "list" else ("s", "str")
    d.name(f"rotate_{'left' if left else 'right'}", "rotate")
    if left:
        body = f"if not {v}:\n    return {v}\nk = {k} % len({v})\nreturn {v}[k:] + {v}[:k]"
        wrong = f"return {v}[{k}:] + {v}[:{k}]"
        how = "moves the first element to the end" if kind == "list" else "moves the first character to the end"
    else:
        body = f"if not {v}:\n    return {v}\nk = {k} % len({v})\nreturn {v}[len({v}) - k:] + {v}[:len({v}) - k]"
        wrong = f"return {v}[-{k}:] + {v}[:-{k}]"
        how = "moves the last element to the front" if kind == "list" else "moves the last character to the front"
    doc = (f"Return {v} rotated {'left' if left else 'right'} by {k} places (one place {how}). When {v} is shorter "
           f"than {k}, rotating by its length changes nothing, so only {k} modulo the length counts. An empty "
           f"{'list' if kind == 'list' else 'string'} stays empty.")
    r = d.cases
    if kind == "list":
        cases = [list(range(1, k + 3)), [], [4, 9], list(range(k - 1)), list(range(5, 5 + 2 * k + 1)),
                 _ints(r, 0, 9, 1, k - 1), _ints(r, 0, 9, k + 1, 2 * k)]
    else:
        cases = ["abcdefghijk"[:k + 2], "", "xy", LETTERS[:k - 1], LETTERS[3:4 + 2 * k],
                 "".join(r.choice(LETTERS) for _ in range(r.randint(1, k - 1))), r.choice(WORDS) * 2]
    return Spec(f"{v}: {typ}", typ, doc, body, wrong, _cases(*cases))


@family("format_number")
def _format_number(d: Draw) -> Spec:
    kind = d.pick("kind", ("group", "group", "zero_pad", "binary"))
    r_cases: list[int]
    if kind == "group":
        sep = d.pick("sep", (",", ".", " ", "_", "'"))
        g = d.pick("g", (3, 4))
        d.name("group_digits", "format_thousands" if g == 3 else "format_groups")
        loop = (f"groups = []\nwhile len(digits) > {g}:\n    groups.insert(0, digits[-{g}:])\n"
                f"    digits = digits[:-{g}]\ngroups.insert(0, digits)\n")
        body = "digits = str(abs(n))\n" + loop + f'return ("-" if n < 0 else "") + {sep!r}.join(groups)'
        wrong = "digits = str(n)\n" + loop + f"return {sep!r}.join(groups)"
        example = sep.join(["1", "234", "567"] if g == 3 else ["123", "4567"])
        doc = (f"Return the decimal digits of the integer n with {sep!r} between groups of {g} digits, counted from "
               f"the right (1234567 gives {example!r}). A negative number keeps its '-' in front, with no "
               f"separator after the '-'.")
        args, r_cases = "n: int", [1234567, 0, -1234, 999, -12, 10 ** 9, -(10 ** g), -123456789]
    elif kind == "zero_pad":
        w = d.int("w", 3, 8)
        d.name("zero_pad", "pad_number")
        body, wrong = f"return str(n).zfill({w})", f'return str(n).rjust({w}, "0")'
        doc = (f"Return str(n) padded on the left with zeros to at least {w} characters; a minus sign stays in front "
               f"of the zeros and counts toward the width (-5 gives {str(-5).zfill(w)!r}). Longer numbers are "
               f"returned unchanged.")
        args, r_cases = "n: int", [5, -5, 0, 10 ** w, -(10 ** (w - 2)), 42, -7]
    else:
        w = d.int("w", 4, 10)
        d.name("to_binary", "binary_digits")
        body, wrong = f"return bin(n)[2:].zfill({w})", f"return bin(n).zfill({w})"
        doc = (f"Return the binary digits of the non-negative integer n (no '0b' prefix), padded on the left with "
               f"zeros to at least {w} digits (5 gives {bin(5)[2:].zfill(w)!r}).")
        args, r_cases = "n: int", [5, 0, 1, 2 ** w, 2 ** w - 1, 37, 1000]
    return Spec(args, "str", doc, body, wrong, _cases(*r_cases))


LABEL_PAIRS = (("Ping", "Pong"), ("Foo", "Bar"), ("Tick", "Tock"), ("Zig", "Zag"), ("Hip", "Hop"), ("Bim", "Bam"))


@family("divisibility_labels")
def _divisibility_labels(d: Draw) -> Spec:
    a, b = d.pick("ab", tuple((a, b) for a in range(2, 10) for b in range(a + 1, 10) if b % a))
    w1, w2 = d.pick("words", LABEL_PAIRS)
    d.name("label", "say_number", f"{w1.lower()}_{w2.lower()}")
    doc = (f"Return {w1 + w2!r} when the positive integer n is divisible by both {a} and {b}, {w1!r} when it is "
           f"divisible by {a} only, {w2!r} when by {b} only, and otherwise n written as a string (str(n)).")
    body = (f"if n % {a} == 0 and n % {b} == 0:\n    return {w1 + w2!r}\nif n % {a} == 0:\n    return {w1!r}\n"
            f"if n % {b} == 0:\n    return {w2!r}\nreturn str(n)")
    wrong = (f"if n % {a} == 0:\n    return {w1!r}\nif n % {b} == 0:\n    return {w2!r}\n"
             f"if n % {a} == 0 and n % {b} == 0:\n    return {w1 + w2!r}\nreturn str(n)")
    lcm = a * b // math.gcd(a, b)
    r = d.cases
    cases = [a, 1, b, lcm, 2 * lcm, a * b + 1, r.randint(1, 200)]
    return Spec("n: int", "str", doc, body, wrong, _cases(*cases))


@family("powers")
def _powers(d: Draw) -> Spec:
    kind = d.pick("kind", ("multiplicity", "is_power", "largest_power"))
    if kind == "multiplicity":
        p = d.int("p", 2, 7)
        d.name(f"count_factor_{p}", "multiplicity")
        doc = (f"Return how many times the positive integer n can be divided by {p} without a remainder, one "
               f"division after another (the exponent of {p} in n; 0 when {p} does not divide n).")
        body = f"count = 0\nwhile n % {p} == 0:\n    n //= {p}\n    count += 1\nreturn count"
        wrong = f"count = 0\nwhile n % {p} == 0 and n > {p}:\n    n //= {p}\n    count += 1\nreturn count"
        cases = [p ** 3 * 5, 1, p, p ** 5, p * (p + 1) + 1, 7 * 11 * 13, 3 * p ** 2]
    elif kind == "is_power":
        p = d.int("b", 2, 6)
        d.name(f"is_power_of_{p}", "is_power")
        doc = (f"Return True if the positive integer n is a power of {p} ({p} ** e for some e >= 0, so 1 is one), "
               f"else False.")
        body, wrong = f"while n % {p} == 0:\n    n //= {p}\nreturn n == 1", f"return n % {p} == 0"
        cases = [p ** 3, 1, p, p ** 6, 2 * p * (p + 1), p + 1, p ** 2 * 3]
    else:
        p = d.int("b", 2, 6)
        d.name(f"largest_power_of_{p}", "floor_power")
        doc = f"Return the largest power of {p} ({p} ** e with e >= 0) that is at most n, for a positive integer n."
        template = "q = 1\nwhile q * {p} {cmp} n:\n    q *= {p}\nreturn q"
        body, wrong = template.format(p=p, cmp="<="), template.format(p=p, cmp="<")
        cases = [p ** 3 + 1, 1, p, p ** 3, p ** 3 - 1, p ** 5, 1000]
    return Spec("n: int", "bool" if kind == "is_power" else "int", doc, body, wrong, _cases(*cases))


@family("reduce_steps")
def _reduce_steps(d: Draw) -> Spec:
    k = d.int("k", 2, 9)
    rule = d.pick("rule", ("to_zero", "to_one", "to_zero_remainder"))
    d.name("count_steps", "steps_to_zero" if rule != "to_one" else "steps_to_one", "reduce_steps")
    other = "subtract the remainder n % " + str(k) if rule == "to_zero_remainder" else "subtract 1"
    goal = "1" if rule == "to_one" else "0"
    doc = (f"Start from the integer n (n >= {'1' if rule == 'to_one' else '0'}). While n is not {goal}: if n is "
           f"divisible by {k}, divide it by {k}; otherwise {other}. Return the number of steps taken (each "
           f"division or subtraction is one step; 0 when n is already {goal}).")
    update = f"n -= n % {k}" if rule == "to_zero_remainder" else "n -= 1"
    loop = "while n {cond}:\n" + f"    if n % {k} == 0:\n        n //= {k}\n    else:\n        {update}\n" + \
        "    steps += 1\n"
    body = "steps = 0\n" + loop.format(cond="!= 0" if goal == "0" else "!= 1") + "return steps"
    wrong = "steps = 0\n" + loop.format(cond="> 1" if goal == "0" else ">= 1") + "return steps"
    r = d.cases
    cases = [k * k + 1, 1, k, 0 if goal == "0" else 2, r.randint(10, 200), 1000, r.randint(201, 5000)]
    return Spec("n: int", "int", doc, body, wrong, _cases(*cases))


@family("run_length")
def _run_length(d: Draw) -> Spec:
    kind = d.pick("kind", ("after", "before", "omit_one", "pairs", "decode_after", "decode_before"))
    if kind.startswith("decode"):
        after = kind == "decode_after"
        d.name("rle_decode", "expand_runs")
        form = "a character followed by its count" if after else "a count followed by its character"
        example = "'a3b12c1'" if after else "'3a12b1c'"
        doc = (f"s is a run-length encoding: a sequence of pieces, each {form} (counts may have several digits; "
               f"the characters are never digits), like {example}. Return the decoded string (each character "
               f"repeated count times); an empty string gives an empty string.")
        if after:
            body = ('out = []\ni = 0\nwhile i < len(s):\n    j = i + 1\n    while j < len(s) and s[j].isdigit():\n'
                    '        j += 1\n    out.append(s[i] * int(s[i + 1:j]))\n    i = j\nreturn "".join(out)')
            wrong = 'return "".join(s[i] * int(s[i + 1]) for i in range(0, len(s), 2))'
            cases = ["a3b1", "", "x12", "a1b2c3", "q10w2e1"]
        else:
            body = ('out = []\ni = 0\nwhile i < len(s):\n    j = i\n    while s[j].isdigit():\n        j += 1\n'
                    '    out.append(s[j] * int(s[i:j]))\n    i = j + 1\nreturn "".join(out)')
            wrong = 'return "".join(s[i + 1] * int(s[i]) for i in range(0, len(s), 2))'
            cases = ["3a1b", "", "12x", "1a2b3c", "10q2w1e"]
        r = d.cases
        runs = [(r.choice("xyz"), r.randint(1, 13)) for _ in range(3)]
        cases.append("".join(f"{c}{n}" if after else f"{n}{c}" for c, n in runs))
        return Spec("s: str", "str", doc, body, wrong, _cases(*cases))
    piece = {"after": "ch + str(count)", "before": "str(count) + ch", "pairs": "(ch, count)",
             "omit_one": "(ch + str(count) if count > 1 else ch)"}[kind]
    shape = {"after": "'aaab' gives 'a3b1'", "before": "'aaab' gives '3a1b'", "omit_one": "'aaab' gives 'a3b'",
             "pairs": "'aaab' gives [('a', 3), ('b', 1)]"}[kind]
    what = {"after": "the character followed by the run's length",
            "before": "the run's length followed by the character",
            "omit_one": "the character followed by the run's length, the length left out when it is 1",
            "pairs": "a (character, length) tuple"}[kind]
    empty, join = ("[]", "out") if kind == "pairs" else ('""', '"".join(out)')
    empty_text = "an empty list" if kind == "pairs" else "an empty string"
    d.name("rle_encode", "run_length_encode", "compress_runs")
    doc = (f"Run-length encode s: replace each run of equal consecutive characters by {what} ({shape}). "
           f"Return {'the list of tuples' if kind == 'pairs' else 'the encoded string'}; an empty string gives "
           f"{empty_text}.")
    loop = (f"if not s:\n    return {empty}\nout = []\ncount = 1\nfor i in range(1, len(s)):\n"
            f"    if s[i] == s[i - 1]:\n        count += 1\n    else:\n        ch = s[i - 1]\n"
            f"        out.append({piece})\n        count = 1\n")
    body = loop + f"ch = s[-1]\nout.append({piece})\nreturn {join}"
    wrong = loop + f"return {join}"
    r = d.cases
    cases = ["aaabccdddd", "", "x", "abc", "z" * 12, "".join(r.choice("pq") * r.randint(1, 4) for _ in range(4))]
    return Spec("s: str", "list[tuple[str, int]]" if kind == "pairs" else "str", doc, body, wrong, _cases(*cases))


BRACKETS = ("()", "[]", "{}", "<>")


def _nested(r: random.Random, pairs: Sequence[str], budget: int) -> str:
    """A random properly nested string of the given bracket pairs, with some letters."""
    out = []
    while budget > 0:
        budget -= 1
        if r.random() < 0.3:
            out.append(r.choice("abxy"))
            continue
        o, c = r.choice(pairs)
        inner = r.randint(0, budget)
        out.append(o + _nested(r, pairs, inner) + c)
        budget -= inner
    return "".join(out)


@family("brackets")
def _brackets(d: Draw) -> Spec:
    op = d.pick("op", ("balanced", "balanced", "balanced", "depth"))
    if op == "depth":
        o, c = d.pick("pair", BRACKETS)
        d.name("max_depth", "nesting_depth")
        doc = (f"s is a string whose {o!r} and {c!r} brackets are properly nested; other characters are ignored. "
               f"Return the largest nesting depth of those brackets ('a{o}b{o}{c}{c}' has depth 2; 0 without "
               f"brackets).")
        body = (f"depth = best = 0\nfor ch in s:\n    if ch == {o!r}:\n        depth += 1\n"
                f"        best = max(best, depth)\n    elif ch == {c!r}:\n        depth -= 1\nreturn best")
        wrong = f"return s.count({o!r})"
        r = d.cases
        cases = _cases(f"{o}{o}{c}{c}{o}{c}", "", "abc", f"{o}a{c}{o}{o}{o}b{c}{c}{c}",
                       *(_nested(r, [o + c], r.randint(3, 8)) for _ in range(3)))
        return Spec("s: str", "int", doc, body, wrong, cases)
    pairs = d.pick("pairs", tuple("".join(p for i, p in enumerate(BRACKETS) if mask >> i & 1) for mask in range(1, 16)))
    pairs = [pairs[i:i + 2] for i in range(0, len(pairs), 2)]
    listed = ", ".join(f"{p[0]!r} {p[1]!r}" for p in pairs)
    d.name("is_balanced", "brackets_match")
    doc = (f"Return True if the brackets of s are balanced, else False. The bracket pairs are {listed}; every "
           f"opening bracket must be closed by its own closing bracket, in the right order (properly nested, so "
           f"closing before opening fails); all other characters are ignored. The empty string is balanced.")
    closing = "{" + ", ".join(f"{p[1]!r}: {p[0]!r}" for p in pairs) + "}"
    opening = "".join(p[0] for p in pairs)
    body = (f"closing = {closing}\nstack = []\nfor ch in s:\n    if ch in {opening!r}:\n        stack.append(ch)\n"
            f"    elif ch in closing:\n        if not stack or stack.pop() != closing[ch]:\n            return False\n"
            f"return not stack")
    wrong = f"return all(s.count(o) == s.count(c) for o, c in {[(p[0], p[1]) for p in pairs]!r})"
    r = d.cases
    o, c = pairs[0]
    o2, c2 = pairs[-1]
    crossed = o + o2 + c + c2 if len(pairs) > 1 else c + o
    cases = _cases(o + "x" + c + o2 + c2, "", c + o, crossed, o + o + c, _nested(r, pairs, 6),
                   _nested(r, pairs, 9) + c + o)
    return Spec("s: str", "bool", doc, body, wrong, cases)


@family("dict_filter")
def _dict_filter(d: Draw) -> Spec:
    kind = d.pick("kind", ("above", "best", "prefix_sum"))
    given = "table maps words to integers."
    if kind == "above":
        t = d.int("t", -2, 10)
        d.name("keys_above", "big_entries")
        doc = f"{given} Return the sorted list of the keys whose value is greater than {t} ([] when there are none)."
        body = f"return sorted(k for k, v in table.items() if v > {t})"
        wrong = f"return sorted(k for k, v in table.items() if v >= {t})"
        returns = "list[str]"
        r = d.cases
        cases = [{"fig": t + 3, "ant": t, "owl": t - 1}, {}, {"cat": t, "bee": t + 1}] + \
            [{w: r.randint(t - 3, t + 3) for w in r.sample(WORDS, r.randint(3, 6))} for _ in range(4)]
    elif kind == "best":
        d.name("best_key", "argmax_key")
        doc = (f"{given} Return the key with the largest value; when several keys share it, the alphabetically "
               f"smallest of them. Return None for an empty dict.")
        body = ("if not table:\n    return None\nbest = max(table.values())\n"
                "return min(k for k, v in table.items() if v == best)")
        wrong = "if not table:\n    return None\nreturn max(table, key=table.get)"
        returns = "str | None"
        r = d.cases
        cases = [{"oak": 5, "elm": 9, "ash": 9}, {}, {"zed": 1, "amy": 1}] + \
            [{w: r.randint(0, 4) for w in r.sample(WORDS, r.randint(3, 7))} for _ in range(4)]
    else:
        c = d.pick("c", LETTERS)
        d.name(f"sum_{c}_keys", "sum_by_initial")
        doc = (f"{given} Return the sum of the values whose key starts with the lowercase letter '{c}' (a key "
               f"starting with '{c.upper()}' does not count); 0 when there are none.")
        body = f'return sum(v for k, v in table.items() if k.startswith("{c}"))'
        wrong = f'return sum(v for k, v in table.items() if k.lower().startswith("{c}"))'
        returns = "int"
        r = d.cases
        cases = [{c + "at": 3, "dog": 4, c + "up": 5}, {}, {c.upper() + "ar": 2, c + "ar": 7}] + \
            [{(r.choice((c, c.upper())) if r.random() < 0.5 else "") + w: r.randint(-5, 9) for w in r.sample(WORDS, 5)}
             for _ in range(4)]
    return Spec("table: dict[str, int]", returns, doc, body, wrong, _cases(*cases))


@family("truncate_pad")
def _truncate_pad(d: Draw) -> Spec:
    kind = d.pick("kind", ("truncate", "pad_left", "pad_right"))
    if kind == "truncate":
        k = d.int("k", 6, 12)
        marker = d.pick("marker", ("...", "~", ".."))
        d.name("truncate", "shorten")
        doc = (f"If s has at most {k} characters return it unchanged; otherwise return its first {k - len(marker)} "
               f"characters followed by {marker!r}, so that the result has exactly {k} characters.")
        body = f"if len(s) <= {k}:\n    return s\nreturn s[:{k - len(marker)}] + {marker!r}"
        wrong = f"if len(s) <= {k}:\n    return s\nreturn s[:{k}] + {marker!r}"
        r = d.cases
        cases = ["a" * (k + 5), "", "b" * k, "c" * (k + 1), "hello world, how are you", r.choice(WORDS),
                 " ".join(_words(r, 3, 5))]
    else:
        w = d.int("w", 4, 10)
        fill = d.pick("fill", ("*", ".", "0", "-"))
        side = "left" if kind == "pad_left" else "right"
        d.name(f"pad_{side}", "align_right" if side == "left" else "align_left")
        doc = (f"Return s padded on the {side} with {fill!r} characters to a length of {w}; a string of {w} or more "
               f"characters is returned unchanged.")
        body = f"return s.rjust({w}, {fill!r})" if side == "left" else f"return s.ljust({w}, {fill!r})"
        wrong = f"return ({fill!r} * {w} + s)[-{w}:]" if side == "left" else f"return (s + {fill!r} * {w})[:{w}]"
        r = d.cases
        cases = ["ab", "", "x" * w, "y" * (w + 3), r.choice(WORDS), " ".join(_words(r, 2, 3)), "q"]
    return Spec("s: str", "str", doc, body, wrong, _cases(*cases))


@family("initials")
def _initials(d: Draw) -> Spec:
    sep = d.pick("sep", (" ", "-", "_", "."))
    joiner = d.pick("joiner", ("", ".", " "))
    case = d.pick("case", ("upper", "lower"))
    d.name("initials", "acronym", "first_letters")
    joined = {"": "with nothing between them", ".": "with '.' between them", " ": "with a space between them"}[joiner]
    doc = (f"s holds words separated by {_sep_name(sep).removeprefix('single ')}; separators may repeat or stand "
           f"at the ends, and the empty parts between them are not words. Return the first letter of each word in "
           f"{case} case, joined {joined} (an empty string when there are no words).")
    body = f"return {joiner!r}.join(w[0].{case}() for w in s.split({sep!r}) if w)"
    wrong = f"return {joiner!r}.join(w[0].{case}() for w in s.split({sep!r}))"
    r = d.cases
    cases = _cases(sep.join(["Ada", "lovelace"]), "", sep.join(["grace", "", "Hopper"]), sep + "alan" + sep,
                   sep.join(_words(r, 3, 5)), sep.join(_mixed_case(r, w) for w in _words(r, 2, 4)) + sep * 2)
    return Spec("s: str", "str", doc, body, wrong, cases)


@family("list_stats")
def _list_stats(d: Draw) -> Spec:
    kind = d.pick("kind", ("lower_median", "median", "mode", "spread", "second_largest", "mean_floor",
                           "kth_smallest", "kth_largest"))
    k = d.int("k", 1, 3) if kind.startswith("kth") else 0
    table = {
        "lower_median": ("lower_median", "the lower median of the non-empty list xs: the element at index "
                         "(len(xs) - 1) // 2 of the sorted list", "return sorted(xs)[(len(xs) - 1) // 2]",
                         "return xs[(len(xs) - 1) // 2]", "int"),
        "median": ("median_floor", "the median of the non-empty list xs: the middle element of the sorted list when "
                   "its length is odd, else the sum of the two middle elements divided by 2 with // (rounded down)",
                   "ys = sorted(xs)\nm = len(ys) // 2\nreturn ys[m] if len(ys) % 2 else (ys[m - 1] + ys[m]) // 2",
                   "m = len(xs) // 2\nreturn xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) // 2", "int"),
        "mode": ("mode", "the most frequent value of the non-empty list xs; on ties, the smallest of them",
                 "return min(xs, key=lambda x: (-xs.count(x), x))", "return max(xs, key=xs.count)", "int"),
        "spread": ("spread", "the largest value of xs minus the smallest (0 for an empty list)",
                   "return max(xs) - min(xs) if xs else 0", "return xs[-1] - xs[0] if xs else 0", "int"),
        "second_largest": ("second_largest", "the second largest distinct value of xs (a value equal to the largest "
                           "does not count); None when xs has fewer than two distinct values",
                           "values = sorted(set(xs))\nreturn values[-2] if len(values) >= 2 else None",
                           "values = sorted(xs)\nreturn values[-2] if len(values) >= 2 else None", "int | None"),
        "mean_floor": ("mean_floor", "the mean of the non-empty list xs rounded down to an integer (floor, so -2.5 "
                       "gives -3): sum(xs) // len(xs)", "return sum(xs) // len(xs)",
                       "return int(sum(xs) / len(xs))", "int"),
        "kth_smallest": (f"smallest_{k}" if k > 1 else "smallest", f"the {_ordinal(k)} smallest element of xs (xs "
                         f"has at least {k} elements; equal values count separately)",
                         f"return sorted(xs)[{k - 1}]", f"return sorted(xs)[{k}]", "int"),
        "kth_largest": (f"largest_{k}" if k > 1 else "largest", f"the {_ordinal(k)} largest element of xs (xs "
                        f"has at least {k} elements; equal values count separately)",
                        f"return sorted(xs)[-{k}]", f"return sorted(xs)[-{k + 1}]", "int"),
    }
    name, what, body, wrong, returns = table[kind]
    d.name(name, "stat_" + name)
    doc = f"Return {what}."
    r = d.cases
    base = [[5, 1, 4, 1, 3], [9, 2, 7, 2], [-3, -7, -4], [4], [6, 6, 2, 2, 8], [8, 3, 8, 5]]
    if kind == "spread" or kind == "second_largest":
        base.insert(1, [])
    if kind.startswith("kth"):
        base = [xs for xs in base if len(xs) >= k] + [list(range(k, 0, -1))]
    cases = base + [_ints(r, -20, 20, max(k, 2), 9) for _ in range(2)]
    return Spec("xs: list[int]", returns, doc, body, wrong, _cases(*cases))


def _ordinal(k: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(k, f"{k}th")


@family("bits")
def _bits(d: Draw) -> Spec:
    kind = d.pick("kind", ("test", "set", "clear", "toggle", "zeros"))
    k = d.int("k", 0, 7) if kind != "zeros" else 0
    table = {
        "test": (f"is_bit_{k}_set", f"True if bit {k} of n is 1, else False (bit 0 is the lowest, worth 1)",
                 f"return (n >> {k}) & 1 == 1", f"return (n >> {k + 1}) & 1 == 1", "bool"),
        "set": (f"set_bit_{k}", f"n with bit {k} set to 1 (bit 0 is the lowest, worth 1); n is unchanged when the "
                f"bit is already 1", f"return n | (1 << {k})", f"return n + (1 << {k})", "int"),
        "clear": (f"clear_bit_{k}", f"n with bit {k} set to 0 (bit 0 is the lowest, worth 1); n is unchanged when "
                  f"the bit is already 0", f"return n & ~(1 << {k})", f"return n ^ (1 << {k})", "int"),
        "toggle": (f"flip_bit_{k}", f"n with bit {k} flipped: 0 becomes 1 and 1 becomes 0 (bit 0 is the lowest, "
                   f"worth 1)", f"return n ^ (1 << {k})", f"return n | (1 << {k})", "int"),
        "zeros": ("count_zero_bits", "how many 0 digits the binary form of n has, without leading zeros (0 is "
                  "written '0', one zero digit)", 'return bin(n)[2:].count("0")', 'return bin(n).count("0")', "int"),
    }
    name, what, body, wrong, returns = table[kind]
    d.name(name, "bit_op" if kind != "zeros" else "zero_bits")
    doc = f"For a non-negative integer n, return {what}."
    r = d.cases
    cases = [1 << k | 5, 0, 255, 1 << k, (1 << k) - 1 if k else 2, r.randint(0, 1023), r.randint(256, 4095)]
    return Spec("n: int", returns, doc, body, wrong, _cases(*cases))


@family("clock")
def _clock(d: Draw) -> Spec:
    sep = d.pick("sep", (":", ".", "h"))
    kind = d.pick("kind", ("to_minutes", "from_minutes", "add", "add", "between"))
    k = d.pick("k", (15, 30, 45, 90, 125, 240, 600, 1000)) if kind == "add" else 0
    fmt = f"'HH{sep}MM' (24-hour clock, two digits each, e.g. '07{sep}05')"
    render = f'return "{{:02d}}{sep}{{:02d}}".format(t // 60, t % 60)'
    parse = f"h, m = s.split({sep!r})\n"
    r = d.cases

    def time() -> str:
        return f"{r.randint(0, 23):02d}{sep}{r.randint(0, 59):02d}"

    if kind == "to_minutes":
        d.name("to_minutes", "minutes_since_midnight")
        doc = f"s is a time {fmt}. Return the number of minutes since midnight."
        body, wrong = parse + "return int(h) * 60 + int(m)", parse + "return int(h) * 100 + int(m)"
        args, returns = "s: str", "int"
        cases = _cases(f"01{sep}30", f"00{sep}00", f"23{sep}59", f"12{sep}05", time(), time())
    elif kind == "from_minutes":
        d.name("format_minutes", "clock_time")
        doc = (f"Return the time of day t minutes after midnight as {fmt}, going around the clock past 24 hours "
               f"(t >= 0; 1500 gives '01{sep}00').")
        body, wrong = "t %= 24 * 60\n" + render, render
        args, returns = "t: int", "str"
        cases = _cases(90, 0, 1500, 59, 1439, 1440, r.randint(0, 5000))
    elif kind == "add":
        d.name(f"add_{k}_minutes", "later_time")
        doc = f"s is a time {fmt}. Return the time {k} minutes later in the same format, going past midnight if needed."
        body = parse + f"t = (int(h) * 60 + int(m) + {k}) % (24 * 60)\n" + render
        wrong = parse + f"t = int(h) * 60 + int(m) + {k}\n" + render
        args, returns = "s: str", "str"
        cases = _cases(f"10{sep}00", f"23{sep}59", f"00{sep}00", f"{(1440 - k) // 60:02d}{sep}{(1440 - k) % 60:02d}",
                       time(), time(), f"22{sep}50")
    else:
        d.name("minutes_between", "wait_time")
        doc = (f"a and b are times {fmt}. Return the number of minutes from a forward to b: if b is earlier in the "
               f"day than a, the wait goes past midnight (0 when a == b).")
        body = (f"ha, ma = a.split({sep!r})\nhb, mb = b.split({sep!r})\n"
                f"return (int(hb) * 60 + int(mb) - int(ha) * 60 - int(ma)) % (24 * 60)")
        wrong = (f"ha, ma = a.split({sep!r})\nhb, mb = b.split({sep!r})\n"
                 f"return int(hb) * 60 + int(mb) - int(ha) * 60 - int(ma)")
        args, returns = "a: str, b: str", "int"
        cases = ((f"08{sep}00", f"09{sep}30"), (f"05{sep}00", f"05{sep}00"), (f"23{sep}00", f"01{sep}15"),
                 (time(), time()), (time(), time()), (f"12{sep}00", f"11{sep}59"))
    return Spec(args, returns, doc, body, wrong, cases)


@family("find_char")
def _find_char(d: Draw) -> Spec:
    op = d.pick("op", ("first", "last", "all"))
    c = d.pick("c", LETTERS)
    nocase = d.pick("nocase", (False, True))
    t = "s.lower()" if nocase else "s"
    which = f"the letter '{c}' in either case ('{c}' or '{c.upper()}')" if nocase else \
        f"the lowercase letter '{c}' ('{c.upper()}' does not count)"
    if op == "first":
        d.name(f"find_{c}", "first_index")
        doc = f"Return the index of the first occurrence in s of {which}, or -1 when there is none."
        body, wrong = f'return {t}.find("{c}")', f'return {t}.index("{c}")'
        returns = "int"
    elif op == "last":
        d.name(f"rfind_{c}", "last_index")
        doc = f"Return the index of the last occurrence in s of {which}, or -1 when there is none."
        body, wrong = f'return {t}.rfind("{c}")', f'return {t}.find("{c}")'
        returns = "int"
    else:
        d.name(f"positions_of_{c}", "all_indexes")
        doc = (f"Return the list of the indexes, in increasing order, of every occurrence in s of {which} ([] "
               f"when none).")
        body = f'return [i for i, ch in enumerate({t}) if ch == "{c}"]'
        wrong = f'return [i for i, ch in enumerate({t}[:-1]) if ch == "{c}"]'
        returns = "list[int]"
    r = d.cases
    other = "".join(ch for ch in "bmqt" if ch != c)
    cases = _cases(f"x{c}y{c}z", "", other, f"{c.upper()}{other}{c}", f"{c}{other}{c.upper()}",
                   "".join(r.choice(other + c + c.upper()) for _ in range(8)), other + c)
    return Spec("s: str", returns, doc, body, wrong, cases)


@family("pair_count")
def _pair_count(d: Draw) -> Spec:
    kind = d.pick("kind", ("sum", "difference"))
    target = d.int("target", -5, 15) if kind == "sum" else d.int("target", 0, 6)
    test = f"xs[i] + xs[j] == {target}" if kind == "sum" else f"abs(xs[i] - xs[j]) == {target}"
    what = f"xs[i] + xs[j] == {target}" if kind == "sum" else \
        f"xs[i] and xs[j] differ by exactly {target} (either one may be the larger)"
    d.name("count_pairs", f"pairs_{'summing' if kind == 'sum' else 'apart'}")
    doc = (f"Return how many pairs of positions i < j of the list xs have {what}. Each pair of positions counts "
           f"once; a position is never paired with itself.")
    template = "count = 0\nfor i in range(len(xs)):\n    for j in range({start}, len(xs)):\n        if {test}:\n" + \
        "            count += 1\nreturn count"
    body = template.format(start="i + 1", test=test)
    wrong = template.format(start="0", test=f"i != j and {test}")  # each pair counted twice
    r = d.cases
    a = r.randint(-5, 10)
    b = target - a if kind == "sum" else a + target
    cases = [[a, b, 3], [], [a, b, b, a], [a], [b, 0, a, 1, b]] + [_ints(r, -5, 15, 4, 9) for _ in range(2)]
    return Spec("xs: list[int]", "int", doc, body, wrong, _cases(*cases))


@family("elementwise")
def _elementwise(d: Draw) -> Spec:
    op = d.pick("op", ("+", "-", "*", "max", "min"))
    policy = d.pick("policy", ("shortest", "fill"))
    fill = d.pick("fill", (0, 1)) if policy == "fill" else None
    expr = f"x {op} y" if op in "+-*" else f"{op}(x, y)"
    what = {"+": "a[i] + b[i]", "-": "a[i] - b[i]", "*": "a[i] * b[i]", "max": "the larger of a[i] and b[i]",
            "min": "the smaller of a[i] and b[i]"}[op]
    d.name({"+": "add_lists", "-": "subtract_lists", "*": "multiply_lists", "max": "pairwise_max",
            "min": "pairwise_min"}[op], "combine")
    if policy == "shortest":
        rule = "The result is as long as the shorter list (extra elements of the longer one are ignored)."
        body = f"return [{expr} for x, y in zip(a, b)]"
        wrong = f"return [{expr.replace('x', 'a[i]').replace('y', 'b[i]')} for i in range(len(a))]"
    else:
        rule = f"The result is as long as the longer list: a missing element of the shorter list counts as {fill}."
        body = (f"n = max(len(a), len(b))\na = a + [{fill}] * (n - len(a))\nb = b + [{fill}] * (n - len(b))\n"
                f"return [{expr} for x, y in zip(a, b)]")
        wrong = f"return [{expr} for x, y in zip(a, b)]"
    doc = f"Return the list whose element i is {what}. {rule}"
    r = d.cases
    cases = [([1, 2, 3], [4, 5, 6]), ([], []), ([5, -2, 7], [1]), ([3], [2, 8, -4]), ([], [1, 2])] + \
        [(_ints(r, -9, 9, 1, 5), _ints(r, -9, 9, 1, 5)) for _ in range(2)]
    return Spec("a: list[int], b: list[int]", "list[int]", doc, body, wrong, tuple(cases))


@family("string_filter")
def _string_filter(d: Draw) -> Spec:
    kind = d.pick("kind", ("remove", "remove", "every_kth", "collapse"))
    if kind == "remove":
        gone = d.pick("letters", tuple(a + b for i, a in enumerate("aeiounrst") for b in "aeiounrst"[i + 1:]))
        d.name("remove_letters", f"strip_{gone}")
        doc = (f"Return s without the letters '{gone[0]}' and '{gone[1]}', removed in either case (upper or lower); "
               f"every other character stays, in order.")
        body, wrong = f'return "".join(ch for ch in s if ch.lower() not in "{gone}")', \
            f'return "".join(ch for ch in s if ch not in "{gone}")'
        r = d.cases
        cases = _cases(f"x{gone[0]}y{gone[1].upper()}z", "", gone.upper() + gone, "bcd",
                       *(_text(r, gone.upper()) for _ in range(3)))
    elif kind == "every_kth":
        k = d.int("k", 2, 5)
        d.name(f"every_{_ordinal(k)}", "sample_chars")
        doc = (f"Return the characters of s at positions 0, {k}, {2 * k}, ... (every {_ordinal(k)} character, "
               f"starting with the first).")
        body, wrong = f"return s[::{k}]", f"return s[{k - 1}::{k}]"
        r = d.cases
        cases = _cases(LETTERS[:2 * k + 1], "", "x", LETTERS, *(_text(r) for _ in range(2)))
    else:
        c = d.pick("c", (" ", "-", "_", "."))
        d.name("collapse_runs", "squeeze")
        doc = f"Return s with every run of two or more consecutive {c!r} characters replaced by a single {c!r}."
        body = (f"out = []\nfor ch in s:\n    if ch == {c!r} and out and out[-1] == {c!r}:\n        continue\n"
                f"    out.append(ch)\nreturn \"\".join(out)")
        wrong = f"return s.replace({c * 2!r}, {c!r})"
        r = d.cases
        cases = _cases(f"a{c * 2}b", "", c * 5, f"x{c}y{c * 3}z",
                       *(c.join(w + c * r.randint(0, 3) for w in _words(r, 2, 4)) for _ in range(3)))
    return Spec("s: str", "str", doc, body, wrong, cases)
