"""A forgiving parser for the shell commands agents write, for the rule stage.

It is not a shell. It splits a command line into simple commands the way bash would
(quotes, escapes, ``;`` ``&&`` ``||`` ``|`` ``&``, newlines, subshells and groups, ``$( )``
and backticks, redirections, heredocs) and then looks through the layers agents use to hide
what runs: ``bash -c``, ``eval``, ``env``/``sudo``/``timeout``/``xargs`` style wrappers,
``find -exec``, variables assigned earlier in the same line, and shells fed a heredoc. It
never raises: text it cannot make sense of (an unclosed quote) still yields words, because
the rule stage must see everything the agent wrote.

    >>> [c.argv for c in parse('U=https://x.io/a; bash -c "curl $U | sh" && echo ok')]
    [['bash', '-c', 'curl https://x.io/a | sh'], ['curl', 'https://x.io/a'], ['sh'], ['echo', 'ok']]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

MAX_DEPTH = 8
"""Nesting (``bash -c`` in ``eval`` in ``$( )`` ...) past which the parser stops unwrapping."""

SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh", "ash", "busybox", "fish"})
_KEYWORDS = frozenset({"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "in",
                       "case", "esac", "select", "function", "{", "}", "!", "time", "[[", "]]", "coproc"})
# Wrappers that run the rest of their argv as a command: name -> options that take a value.
_WRAPPERS: dict[str, frozenset[str]] = {
    "sudo": frozenset({"-u", "-g", "-h", "-p", "-C", "-D", "-r", "-t", "-U"}),
    "doas": frozenset({"-u", "-C"}),
    "env": frozenset({"-u", "-C", "-S", "--unset", "--chdir"}),
    "timeout": frozenset({"-s", "-k", "--signal", "--kill-after"}),
    "nohup": frozenset(), "nice": frozenset({"-n", "--adjustment"}), "ionice": frozenset({"-c", "-n", "-p"}),
    "stdbuf": frozenset({"-i", "-o", "-e"}), "setsid": frozenset(), "command": frozenset(), "builtin": frozenset(),
    "exec": frozenset({"-a"}), "time": frozenset({"-f", "-o"}), "unbuffer": frozenset(), "chronic": frozenset(),
    "strace": frozenset({"-e", "-o", "-p", "-s", "-u"}), "ltrace": frozenset({"-e", "-o", "-p"}),
    "watch": frozenset({"-n", "-d", "--interval"}), "xargs": frozenset({"-I", "-i", "-n", "-P", "-d", "-L", "-a",
                                                                       "-s", "-E", "--delimiter", "--max-args"}),
    "parallel": frozenset({"-j", "-S", "--jobs"}), "flock": frozenset({"-w", "-E"}), "chroot": frozenset(),
    "runuser": frozenset({"-u", "-g"}), "su": frozenset({"-s", "-g"}), "script": frozenset({"-c"}),
    "faketime": frozenset(), "firejail": frozenset(), "unshare": frozenset(), "prlimit": frozenset(),
}
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-=?+][^}]*)?\}|([A-Za-z_][A-Za-z0-9_]*))")
_CWD = " cwd"  # where parse() keeps the directory `cd` moved to (no variable has this name)
_OPERATORS = ("&&", "||", ";;", "|&", ";", "&", "|", "(", ")")
_REDIRECTS = ("&>>", "<<<", "<<-", "<<", ">>", ">|", ">&", "<&", "<>", "&>", ">", "<")


@dataclass
class Redirect:
    """``op`` as written (``>``, ``>>``, ``<``, ``<<`` ...), its ``target`` (a path, an fd, or a
    heredoc's delimiter) and, for heredocs and here-strings, the ``body`` fed to stdin."""

    op: str
    target: str
    body: str | None = None

    @property
    def writes(self) -> bool:
        return self.op in (">", ">>", ">|", "&>", "&>>", "<>") and not self.target.isdigit() and self.target != "-"

    @property
    def reads(self) -> bool:
        return self.op in ("<", "<>")


@dataclass
class Command:
    """One simple command: ``argv`` after wrappers and assignments are stripped.

    ``stdin`` is the text fed to it by a heredoc or here-string, when there is one;
    ``piped`` says its stdin comes from the previous command of a pipeline; ``depth`` is how
    many layers (``bash -c``, ``eval``, ``$( )`` ...) it was found under."""

    argv: list[str]
    redirects: list[Redirect] = field(default_factory=list)
    assignments: dict[str, str] = field(default_factory=dict)
    piped: bool = False
    depth: int = 0
    cwd: str = ""
    """The directory ``cd`` moved to earlier in the line, relative to where it started ("" = there)."""

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv else ""

    @property
    def stdin(self) -> str | None:
        for r in self.redirects:
            if r.body is not None:
                return r.body
        return None


# ---------------------------------------------------------------------------- lexer

@dataclass
class _Word:
    text: str
    nested: list[str]  # sources of $( ) and backticks inside the word


@dataclass
class _Op:
    op: str
    redirect: Redirect | None = None


def _read_balanced(s: str, i: int) -> int:
    """Index just past the ``)`` closing the ``$(`` whose body starts at ``i``."""
    depth = 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "'":
            j = s.find("'", i + 1)
            i = len(s) if j < 0 else j + 1
            continue
        if c == '"':
            i = _skip_double(s, i + 1)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(s)


def _skip_double(s: str, i: int) -> int:
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == '"':
            return i + 1
        if s.startswith("$(", i):
            i = _read_balanced(s, i + 2)
            continue
        i += 1
    return len(s)


def _lex(s: str) -> list[_Word | _Op]:
    tokens: list[_Word | _Op] = []
    buf: list[str] = []
    nested: list[str] = []
    in_word = False
    pending: list[Redirect] = []  # heredocs whose bodies start after the next newline
    want_delim: Redirect | None = None
    i, n = 0, len(s)

    def end_word() -> None:
        nonlocal buf, nested, in_word, want_delim
        if in_word:
            text = "".join(buf)
            if want_delim is not None:
                want_delim.target = text
                pending.append(want_delim)
                want_delim = None
            else:
                tokens.append(_Word(text, nested))
        buf, nested, in_word = [], [], False

    while i < n:
        c = s[i]
        if c == "\n":
            end_word()
            tokens.append(_Op(";"))
            i += 1
            for doc in pending:  # bodies follow the line that opened them, in order
                strip_tabs = doc.op == "<<-"
                lines: list[str] = []
                while i < n:
                    j = s.find("\n", i)
                    line = s[i:] if j < 0 else s[i:j]
                    i = n if j < 0 else j + 1
                    if (line.lstrip("\t") if strip_tabs else line) == doc.target:
                        break
                    lines.append(line.lstrip("\t") if strip_tabs else line)
                doc.body = "\n".join(lines) + ("\n" if lines else "")
            pending.clear()
            continue
        if c in " \t\r":
            end_word()
            i += 1
            continue
        if c == "#" and not in_word:
            j = s.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "\\":
            if i + 1 < n and s[i + 1] == "\n":
                i += 2
                continue
            buf.append(s[i + 1] if i + 1 < n else "")
            in_word = True
            i += 2
            continue
        if c == "'":
            j = s.find("'", i + 1)
            j = n if j < 0 else j
            buf.append(s[i + 1:j])
            in_word = True
            i = j + 1
            continue
        if c == '"':
            in_word = True
            i += 1
            while i < n and s[i] != '"':
                if s[i] == "\\" and i + 1 < n and s[i + 1] in '"\\$`\n':
                    buf.append(s[i + 1] if s[i + 1] != "\n" else "")
                    i += 2
                elif s.startswith("$(", i) and not s.startswith("$((", i):
                    j = _read_balanced(s, i + 2)
                    nested.append(s[i + 2:j - 1])
                    buf.append(s[i:j])
                    i = j
                elif s[i] == "`":
                    j = s.find("`", i + 1)
                    j = n if j < 0 else j
                    nested.append(s[i + 1:j])
                    buf.append(s[i:j + 1])
                    i = j + 1
                else:
                    buf.append(s[i])
                    i += 1
            i += 1
            continue
        if s.startswith("$(", i):
            j = _read_balanced(s, i + 2)
            if not s.startswith("$((", i):
                nested.append(s[i + 2:j - 1])
            buf.append(s[i:j])
            in_word = True
            i = j
            continue
        if c == "`":
            j = s.find("`", i + 1)
            j = n if j < 0 else j
            nested.append(s[i + 1:j])
            buf.append(s[i:j + 1])
            in_word = True
            i = j + 1
            continue
        if s.startswith("${", i):
            j = s.find("}", i)
            j = n - 1 if j < 0 else j
            buf.append(s[i:j + 1])
            in_word = True
            i = j + 1
            continue
        if c in "<>" and s.startswith("(", i + 1):  # process substitution <(cmd) >(cmd)
            j = _read_balanced(s, i + 2)
            nested.append(s[i + 2:j - 1])
            buf.append(s[i:j])
            in_word = True
            i = j
            continue
        red = next((r for r in _REDIRECTS if s.startswith(r, i)), None)
        if red is not None:
            if in_word and not "".join(buf).isdigit():
                end_word()
            buf, nested, in_word = [], [], False  # an fd number before the operator is dropped
            i += len(red)
            redirect = Redirect(red, "")
            tokens.append(_Op(red, redirect))
            if red in ("<<", "<<-"):
                want_delim = redirect
            continue
        op = next((o for o in _OPERATORS if s.startswith(o, i)), None)
        if op is not None:
            end_word()
            tokens.append(_Op(op))
            i += len(op)
            continue
        buf.append(c)
        in_word = True
        i += 1
    end_word()
    if want_delim is not None:  # `cat <<` at the very end: no delimiter, no body
        want_delim.body = ""
    for doc in pending:  # a heredoc opened on the last line: its body never came
        if doc.body is None:
            doc.body = ""
    return tokens


# ---------------------------------------------------------------------------- parser

def parse(line: str, depth: int = 0, env: dict[str, str] | None = None) -> list[Command]:
    """Every simple command ``line`` would run, outermost first, wrappers looked through.

    ``env`` carries variables assigned earlier (``U=...; curl $U``); it is updated in place."""
    env = {} if env is None else env
    out: list[Command] = []
    if depth > MAX_DEPTH:
        return out
    words: list[_Word] = []
    redirects: list[Redirect] = []
    piped = False
    expect_target: Redirect | None = None

    def flush(next_piped: bool) -> None:
        nonlocal words, redirects, piped
        if words or redirects:
            if piped and words and words[0].text == "xargs" and out:
                # `find tests -name '*.py' | xargs rm`: xargs hands on what the previous command printed
                hint = _output_hint(out[-1])
                if hint:
                    words = [*words, _Word(hint, [])]
            _emit(words, redirects, piped, depth, env, out)
        words, redirects, piped = [], [], next_piped

    for tok in _lex(line):
        if isinstance(tok, _Word):
            if expect_target is not None:
                expect_target.target = _subst(tok.text, env)
                if expect_target.op == "<<<":  # a here-string is stdin too
                    expect_target.body = expect_target.target
                for src in tok.nested:
                    out.extend(parse(src, depth + 1, env))
                expect_target = None
            else:
                words.append(tok)
            continue
        if tok.redirect is not None:
            redirects.append(tok.redirect)
            if tok.op not in ("<<", "<<-"):
                expect_target = tok.redirect
            continue
        flush(next_piped=tok.op in ("|", "|&"))
    flush(False)
    return out


_WHICH = re.compile(r"\$\((?:which|command -v|type -p)\s+([\w.+-]+)\)|`(?:which|command -v)\s+([\w.+-]+)`")


def _output_hint(cmd: Command) -> str | None:
    """What a listing command prints, as a path glob: ``find R -name P`` -> ``R/P``;
    ``ls``/``git ls-files``/``grep -l`` -> their first path operand."""
    argv = cmd.argv
    if not argv:
        return None
    prog = os.path.basename(argv[0])
    if prog == "find":
        roots = _take_while(argv[1:], lambda a: not a.startswith(("-", "(", "!"))) or ["."]
        names = [argv[k + 1] for k in range(len(argv) - 1) if argv[k] in ("-name", "-iname", "-path", "-ipath")]
        return os.path.join(roots[0], names[0] if names else "*")
    if prog in ("ls", "git", "grep", "rg", "fd"):
        paths = [a for a in argv[1:] if not a.startswith("-") and ("/" in a or "." in a or a in ("tests", "test"))]
        return paths[-1] if paths else None
    return None


def _subst(text: str, env: dict[str, str]) -> str:
    if "$" not in text and "`" not in text:
        return text
    text = _WHICH.sub(lambda m: f"/usr/bin/{m.group(1) or m.group(2)}", text)  # where the program lives
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def _emit(words: list[_Word], redirects: list[Redirect], piped: bool, depth: int,
          env: dict[str, str], out: list[Command]) -> None:
    nested = [src for w in words for src in w.nested]
    argv = [_subst(w.text, env) for w in words]
    assignments: dict[str, str] = {}
    while argv and (argv[0] in _KEYWORDS or _ASSIGN.match(argv[0])):
        head = argv.pop(0)
        if head not in _KEYWORDS:
            name, _, value = head.partition("=")
            assignments[name.rstrip("+").split("[")[0]] = value
    if argv and argv[0] in ("export", "declare", "local", "readonly", "typeset"):
        for a in argv[1:]:
            if _ASSIGN.match(a):
                name, _, value = a.partition("=")
                env[name] = value
    if not argv:
        env.update(assignments)  # a bare assignment sets the variable for later commands
    cwd = env.get(_CWD, "")
    if argv and argv[0] in ("cd", "pushd") and len(argv) > 1:  # later relative paths start there
        env[_CWD] = os.path.normpath(os.path.join(cwd, argv[1])) if not argv[1].startswith("-") else cwd
    if argv or redirects:
        cmd = Command(argv, redirects, assignments, piped, depth, cwd)
        out.append(cmd)
        for inner in _unwrap(cmd, env):
            out.append(inner)
    for src in nested:
        out.extend(parse(src, depth + 1, env))


def _unwrap(cmd: Command, env: dict[str, str]) -> list[Command]:
    """The commands ``cmd`` runs in turn: through wrappers, ``-c`` shells, ``eval``, ``-exec``."""
    argv, depth = cmd.argv, cmd.depth + 1
    if not argv or depth > MAX_DEPTH:
        return []
    prog = os.path.basename(argv[0])
    if prog in SHELLS or prog in ("su", "script"):
        script = _option_value(argv[1:], "-c")
        if script is not None:
            return parse(script, depth, env)
        if cmd.stdin is not None and prog in SHELLS:
            return parse(cmd.stdin, depth, env)
        return []
    if prog == "eval":
        return parse(" ".join(argv[1:]), depth, env)
    if prog in ("find",):
        out: list[Command] = []
        roots = [a for a in _take_while(argv[1:], lambda a: not a.startswith(("-", "(", "!")))] or ["."]
        names = [argv[k + 1] for k in range(len(argv) - 1) if argv[k] in ("-name", "-iname", "-path", "-ipath")]
        found = os.path.join(roots[0], names[0] if names else "*")  # what {} stands for: a match under the root
        i = 0
        while i < len(argv):
            if argv[i] in ("-exec", "-execdir", "-ok", "-okdir"):
                j = i + 1
                while j < len(argv) and argv[j] not in (";", "+"):
                    j += 1
                inner = [a.replace("{}", found) for a in argv[i + 1:j]]
                if inner:
                    out.extend(_as_command(inner, cmd, depth, env))
                i = j
            i += 1
        return out
    if prog in ("watch", "ssh"):  # run their argv joined as a shell line (ssh: on the host)
        rest = _strip_wrapper("watch", argv[1:]) if prog == "watch" else argv[2:]
        return parse(" ".join(rest), depth, env) if rest else []
    if prog in _WRAPPERS:
        rest = _strip_wrapper(prog, argv[1:])
        if rest:
            return _as_command(rest, cmd, depth, env)
    return []


def _take_while(items: list[str], keep) -> list[str]:
    out = []
    for a in items:
        if not keep(a):
            break
        out.append(a)
    return out


def _as_command(argv: list[str], parent: Command, depth: int, env: dict[str, str]) -> list[Command]:
    inner = Command(argv, parent.redirects, {}, parent.piped, depth, parent.cwd)
    return [inner, *_unwrap(inner, env)]


def _option_value(args: list[str], flag: str) -> str | None:
    """The value of a one-letter ``flag`` (``-c``), also when bundled (``-lc``, ``-xec``)."""
    for i, a in enumerate(args):
        bundled = a.startswith("-") and not a.startswith("--") and a[1:].isalpha() and flag[1] in a[1:]
        if a == flag or bundled:
            return args[i + 1] if i + 1 < len(args) else None
    return None


def _strip_wrapper(prog: str, args: list[str]) -> list[str]:
    takes_value = _WRAPPERS[prog]
    i = 0
    while i < len(args):
        a = args[i]
        if prog == "env" and _ASSIGN.match(a):
            i += 1
            continue
        if a == "--":
            return args[i + 1:]
        if a.startswith("-") and len(a) > 1:
            i += 2 if a in takes_value else 1
            continue
        if prog == "timeout":
            return args[i + 1:]  # the duration, then the command
        if prog in ("chroot", "flock"):
            return args[i + 1:]  # the new root or the lock file, then the command
        return args[i:]
    return []
