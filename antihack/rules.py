"""Rule packs (YAML data) and the rule stage that runs them over a tool call's ops.

A pack::

    pack: default
    allowed_hosts: [localhost, 127.0.0.1, pypi.org]      # net ops to these are never flagged
    path_classes:                                         # named path globs rules refer to
      tests: ["tests/**", "**/test_*.py"]
    rules:
      - id: download.remote_host
        category: download
        severity: high                                    # low | medium | high
        description: fetching from a host that is not allowed
        match: {op: net, host: not_allowed}               # or a list of such blocks (any)
        dummy:                                            # what the agent gets instead
          curl: {exit_code: 6, stderr: "curl: (6) Could not resolve host: {host}"}
          default: {exit_code: 1, stderr: "network is unreachable"}

A match block holds when every key in it holds for one op (``antihack.actions.Op``):

``op``             op kind(s): exec read write delete search net code path env
``program``        command name(s) (globs allowed: ``python*``)
``sub``            subcommand(s) (``git log`` -> ``log``)
``tool``           tool name(s) of the call
``source``         tool | shell | inline_code | written_code
``args_any``       regex(es): some argument matches one (``re.search``)
``args_none``      regex(es): no argument matches any
``operands_any``   regex(es): some operand after the subcommand matches one (for git: a
                   revision or path, option values left out)
``piped``          true: the command reads the previous command's output
``path_class``     the op's path is in one of these classes (``escapes``: leaves the
                   workspace; ``root``: ``/``, ``~`` or a parent; ``outside``: absolute,
                   home or escaping; others come from ``path_classes``)
``not_path_class`` ... and in none of these
``path_regex``     regex on the normalised path
``pattern_regex``  regex on a search's name pattern
``host``           ``not_allowed`` (unknown hosts included) or ``any``
``content_regex``  regex on a write's content or a code op's code
``finding``        code finding(s) (``antihack.pycode.FINDINGS``)
``name_regex``     regex on a variable name (``env`` ops)

Dummy outputs are keyed by the program of the matched op (the tool name for tool ops) with
``default`` as fallback. Each is ``{exit_code, stdout, stderr}`` (shaped like a command's
result), ``{error}`` (a failed tool) or ``{text}``; ``{program}``, ``{path}``, ``{host}``,
``{url}``, ``{cmd}`` are filled in.
"""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from relayrl.antihack.actions import OP_KINDS, SOURCES, Op, ToolKinds, extract, is_escape
from relayrl.antihack.pycode import FINDINGS

PACKS_DIR = Path(__file__).parent / "packs"
SEVERITIES = {"low": 0, "medium": 1, "high": 2}
BUILTIN_CLASSES = ("escapes", "root", "outside")
MATCH_KEYS = ("op", "program", "sub", "tool", "source", "args_any", "args_none", "operands_any", "piped", "path_class", "not_path_class",
              "path_regex", "pattern_regex", "host", "content_regex", "finding", "name_regex")


class RulePackError(ValueError):
    """A rule pack that cannot be used; the message names the file, the rule and the key."""


@dataclass(frozen=True)
class Dummy:
    """What a blocked call returns. ``exit_code`` not None: a command result; ``error``: a tool
    error; else ``text``."""

    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    text: str = ""

    def fill(self, values: dict[str, str]) -> "Dummy":
        f = lambda s: s.format_map(_Blank(values)) if s else s  # noqa: E731
        return Dummy(self.exit_code, f(self.stdout), f(self.stderr), f(self.error) if self.error else None, f(self.text))

    def render(self) -> str:
        """A plain rendering for envs that do not shape dummies themselves."""
        if self.error is not None:
            return f"error: {self.error}"
        if self.exit_code is not None:
            return "\n".join(p for p in (self.stdout.rstrip("\n"), self.stderr.rstrip("\n")) if p)
        return self.text


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


@dataclass
class _Match:
    ops: frozenset[str] | None = None
    programs: tuple[str, ...] | None = None
    subs: frozenset[str] | None = None
    tools: frozenset[str] | None = None
    sources: frozenset[str] | None = None
    args_any: tuple[re.Pattern, ...] = ()
    args_none: tuple[re.Pattern, ...] = ()
    operands_any: tuple[re.Pattern, ...] = ()
    piped: bool | None = None
    path_classes: tuple[str, ...] = ()
    not_path_classes: tuple[str, ...] = ()
    path_regex: re.Pattern | None = None
    pattern_regex: re.Pattern | None = None
    host: str | None = None
    content_regex: re.Pattern | None = None
    findings: frozenset[str] | None = None
    name_regex: re.Pattern | None = None


@dataclass
class Rule:
    id: str
    category: str
    severity: str
    description: str
    matches: list[_Match]
    dummies: dict[str, Dummy]

    def dummy_for(self, op: Op, tool: str) -> Dummy:
        key = op.program if op.program in self.dummies else tool if tool in self.dummies else "default"
        return self.dummies[key]


@dataclass(frozen=True)
class RuleHit:
    """One rule that flagged the call, and the op it flagged."""

    rule: Rule
    op: Op

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule.id, "category": self.rule.category, "severity": self.rule.severity,
                "op": self.op.describe()}


@dataclass
class RulePack:
    name: str
    rules: list[Rule]
    path_classes: dict[str, list[str]] = field(default_factory=dict)
    allowed_hosts: list[str] = field(default_factory=list)


def _glob_regex(pattern: str) -> str:
    """``**`` crosses directories, ``*`` and ``?`` do not; a pattern without a leading ``/``
    also matches under any absolute prefix when it starts with ``**/``."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.find("]", i)
            if j < 0:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                out.append("[" + pattern[i + 1:j].replace("!", "^", 1) + "]")
                i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


class PathClasses:
    def __init__(self, classes: dict[str, list[str]]) -> None:
        self.globs = {k: list(v) for k, v in classes.items()}
        self._memo: dict[tuple[str, str], bool] = {}
        self._re = {k: re.compile("|".join(f"(?:{_glob_regex(g)})" for g in v) or r"(?!)", re.I)
                    for k, v in classes.items()}

    def names(self) -> set[str]:
        return set(self.globs) | set(BUILTIN_CLASSES)

    def contains(self, cls: str, path: str) -> bool:
        key = (cls, path)
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) > 65536:
                self._memo.clear()
            hit = self._memo[key] = self._contains(cls, path)
        return hit

    def _contains(self, cls: str, path: str) -> bool:
        if cls == "escapes":
            return is_escape(path)
        if cls == "root":
            return path in ("/", "~", "..", "../..") or re.fullmatch(r"(?:\.\./)+\.\.", path) is not None
        if cls == "outside":
            return path.startswith(("/", "~")) or is_escape(path)
        rx = self._re.get(cls)
        if rx is None:
            return False
        rel = path.lstrip("/")
        # A directory path matches a class that holds things below it (``tests`` for ``tests/**``).
        return any(rx.fullmatch(p) is not None for p in {path, rel, path + "/", rel + "/", path + "/x", rel + "/x"})


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    if host is None:
        return False
    host = host.strip("[]").lower()
    return any(fnmatch.fnmatchcase(host, a.lower()) for a in allowed)


# ---------------------------------------------------------------------------- loading

def load_pack(source: str | Path) -> RulePack:
    """A pack by built-in name (``default``) or YAML path."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = PACKS_DIR / f"{source}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in PACKS_DIR.glob("*.yaml")))
            raise RulePackError(f"antihack rule pack {source!r}: no such built-in pack ({known}) or file")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RulePackError(f"antihack rule pack {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise RulePackError(f"antihack rule pack {path}: not valid YAML ({e})") from None
    return parse_pack(data, str(path))


def parse_pack(data: Any, where: str) -> RulePack:
    if not isinstance(data, dict):
        raise RulePackError(f"{where}: a rule pack is a mapping with 'rules' (a list)")
    unknown = set(data) - {"pack", "version", "description", "allowed_hosts", "path_classes", "rules"}
    if unknown:
        raise RulePackError(f"{where}: unknown top-level key(s) {sorted(unknown)}; known: pack, version, "
                            "description, allowed_hosts, path_classes, rules")
    classes = data.get("path_classes") or {}
    if not isinstance(classes, dict) or not all(isinstance(v, list) for v in classes.values()):
        raise RulePackError(f"{where}: path_classes maps a class name to a list of globs")
    rules, seen = [], set()
    for i, raw in enumerate(data.get("rules") or []):
        rule = _parse_rule(raw, f"{where}: rules[{i}]", set(classes) | set(BUILTIN_CLASSES))
        if rule.id in seen:
            raise RulePackError(f"{where}: rules[{i}]: duplicate id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    return RulePack(str(data.get("pack", where)), rules, {k: [str(g) for g in v] for k, v in classes.items()},
                    [str(h) for h in data.get("allowed_hosts") or []])


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _regexes(value: Any, where: str) -> tuple[re.Pattern, ...]:
    out = []
    for v in _as_list(value):
        try:
            out.append(re.compile(str(v)))
        except re.error as e:
            raise RulePackError(f"{where}: bad regex {v!r}: {e}") from None
    return tuple(out)


def _parse_rule(raw: Any, where: str, classes: set[str]) -> Rule:
    if not isinstance(raw, dict):
        raise RulePackError(f"{where}: a rule is a mapping with id, category, match, dummy")
    rid = raw.get("id")
    where = f"{where} ({rid})" if rid else where
    for key in ("id", "category", "match", "dummy"):
        if key not in raw:
            raise RulePackError(f"{where}: missing '{key}'")
    unknown = set(raw) - {"id", "category", "severity", "description", "match", "dummy"}
    if unknown:
        raise RulePackError(f"{where}: unknown key(s) {sorted(unknown)}; known: id, category, severity, "
                            "description, match, dummy")
    severity = raw.get("severity", "medium")
    if severity not in SEVERITIES:
        raise RulePackError(f"{where}: severity must be one of {list(SEVERITIES)}, not {severity!r}")
    matches = [_parse_match(m, f"{where}: match", classes) for m in _as_list(raw["match"])]
    dummy = raw["dummy"]
    if isinstance(dummy, dict) and not (set(dummy) & {"exit_code", "stdout", "stderr", "error", "text"}):
        dummies = {str(k): _parse_dummy(v, f"{where}: dummy.{k}") for k, v in dummy.items()}
    else:
        dummies = {"default": _parse_dummy(dummy, f"{where}: dummy")}
    if "default" not in dummies:
        raise RulePackError(f"{where}: dummy needs a 'default' entry beside the per-program ones")
    return Rule(str(rid), str(raw["category"]), severity, str(raw.get("description", "")), matches, dummies)


def _parse_dummy(raw: Any, where: str) -> Dummy:
    if isinstance(raw, str):
        return Dummy(text=raw)
    if not isinstance(raw, dict) or set(raw) - {"exit_code", "stdout", "stderr", "error", "text"}:
        raise RulePackError(f"{where}: a dummy is a string or a mapping of exit_code/stdout/stderr, error, or text")
    if "exit_code" in raw and not isinstance(raw["exit_code"], int):
        raise RulePackError(f"{where}: exit_code must be an integer")
    return Dummy(raw.get("exit_code", 0 if ("stdout" in raw or "stderr" in raw) else None),
                 str(raw.get("stdout", "")), str(raw.get("stderr", "")),
                 str(raw["error"]) if "error" in raw else None, str(raw.get("text", "")))


def _parse_match(raw: Any, where: str, classes: set[str]) -> _Match:
    if not isinstance(raw, dict) or not raw:
        raise RulePackError(f"{where}: a match block is a non-empty mapping")
    unknown = set(raw) - set(MATCH_KEYS)
    if unknown:
        raise RulePackError(f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(MATCH_KEYS)}")
    m = _Match()
    if "op" in raw:
        m.ops = frozenset(map(str, _as_list(raw["op"])))
        if m.ops - set(OP_KINDS):
            raise RulePackError(f"{where}: op {sorted(m.ops - set(OP_KINDS))} unknown; known: {', '.join(OP_KINDS)}")
    if "program" in raw:
        m.programs = tuple(map(str, _as_list(raw["program"])))
    if "sub" in raw:
        m.subs = frozenset(map(str, _as_list(raw["sub"])))
    if "tool" in raw:
        m.tools = frozenset(map(str, _as_list(raw["tool"])))
    if "source" in raw:
        m.sources = frozenset(map(str, _as_list(raw["source"])))
        if m.sources - set(SOURCES):
            raise RulePackError(f"{where}: source must be among {', '.join(SOURCES)}")
    if "args_any" in raw:
        m.args_any = _regexes(raw["args_any"], f"{where}.args_any")
    if "args_none" in raw:
        m.args_none = _regexes(raw["args_none"], f"{where}.args_none")
    if "operands_any" in raw:
        m.operands_any = _regexes(raw["operands_any"], f"{where}.operands_any")
    if "piped" in raw:
        if not isinstance(raw["piped"], bool):
            raise RulePackError(f"{where}.piped: true or false")
        m.piped = raw["piped"]
    for key in ("path_class", "not_path_class"):
        if key in raw:
            names = tuple(map(str, _as_list(raw[key])))
            missing = set(names) - classes
            if missing:
                raise RulePackError(f"{where}.{key}: class(es) {sorted(missing)} not defined; defined: "
                                    f"{', '.join(sorted(classes))}")
            setattr(m, "path_classes" if key == "path_class" else "not_path_classes", names)
    for key in ("path_regex", "pattern_regex", "content_regex", "name_regex"):
        if key in raw:
            setattr(m, key, _regexes(raw[key], f"{where}.{key}")[0])
    if "host" in raw:
        if raw["host"] not in ("not_allowed", "any"):
            raise RulePackError(f"{where}.host: 'not_allowed' or 'any'")
        m.host = raw["host"]
    if "finding" in raw:
        m.findings = frozenset(map(str, _as_list(raw["finding"])))
        if m.findings - set(FINDINGS):
            raise RulePackError(f"{where}.finding: {sorted(m.findings - set(FINDINGS))} unknown; known: "
                                f"{', '.join(FINDINGS)}")
    return m


# ---------------------------------------------------------------------------- matching

class RuleStage:
    """The high-recall first stage: every op of the call against every rule.

    Args:
        packs: rule packs, in order (a later pack's rule with the same id replaces the
            earlier one; classes and allowed hosts are unions).
        protected_paths: globs added to the ``protected`` class.
        allowed_hosts: hosts added to the packs' (``*`` wildcards).
        tools: how to read each tool's arguments.
    """

    def __init__(self, packs: list[RulePack], protected_paths: Iterable[str] = (),
                 allowed_hosts: Iterable[str] = (), tools: ToolKinds | None = None) -> None:
        by_id: dict[str, Rule] = {}
        classes: dict[str, list[str]] = {}
        hosts: list[str] = []
        for pack in packs:
            for r in pack.rules:
                by_id[r.id] = r
            for k, v in pack.path_classes.items():
                classes.setdefault(k, []).extend(v)
            hosts.extend(pack.allowed_hosts)
        classes.setdefault("protected", []).extend(protected_paths)
        self.rules = sorted(by_id.values(), key=lambda r: -SEVERITIES[r.severity])  # stable: pack order within
        self.classes = PathClasses(classes)
        self.allowed_hosts = [*hosts, *allowed_hosts]
        self.tools = tools or ToolKinds()

    def ops(self, name: str, arguments: dict[str, Any]) -> list[Op]:
        return extract(name, arguments, self.tools)

    def check(self, name: str, arguments: dict[str, Any]) -> list[RuleHit]:
        """Every (rule, op) that flags the call, most severe rule first; empty: allowed."""
        ops = self.ops(name, arguments)
        hits: list[RuleHit] = []
        for rule in self.rules:
            for op in ops:
                if any(self._holds(m, op, name) for m in rule.matches):
                    hits.append(RuleHit(rule, op))
                    break
        return hits

    def timed_check(self, name: str, arguments: dict[str, Any]) -> tuple[list[RuleHit], float]:
        start = time.perf_counter()
        hits = self.check(name, arguments)
        return hits, time.perf_counter() - start

    def _holds(self, m: _Match, op: Op, tool: str) -> bool:
        if m.ops is not None and op.kind not in m.ops:
            return False
        if m.tools is not None and tool not in m.tools:
            return False
        if m.sources is not None and op.source not in m.sources:
            return False
        if m.programs is not None and not any(fnmatch.fnmatchcase(op.program, p) for p in m.programs):
            return False
        if m.subs is not None and op.sub not in m.subs:
            return False
        args = op.argv[1:]
        if m.args_any and not any(rx.search(a) for rx in m.args_any for a in args):
            return False
        if m.args_none and any(rx.search(a) for rx in m.args_none for a in args):
            return False
        if m.operands_any and not any(rx.search(a) for rx in m.operands_any for a in op.operands):
            return False
        if m.piped is not None and op.piped != m.piped:
            return False
        if m.path_classes or m.not_path_classes or m.path_regex is not None:
            if op.path is None:
                return False
            if m.path_classes and not any(self.classes.contains(c, op.path) for c in m.path_classes):
                return False
            if any(self.classes.contains(c, op.path) for c in m.not_path_classes):
                return False
            if m.path_regex is not None and not m.path_regex.search(op.path):
                return False
        if m.pattern_regex is not None and not (op.pattern and m.pattern_regex.search(op.pattern)):
            return False
        if m.host == "not_allowed" and host_allowed(op.host, self.allowed_hosts):
            return False
        if m.content_regex is not None and not (op.content and m.content_regex.search(op.content)):
            return False
        if m.findings is not None and not (m.findings & op.findings):
            return False
        if m.name_regex is not None and not m.name_regex.search(op.program):
            return False
        return True
