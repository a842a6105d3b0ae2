"""From a tool call to the actions it would take (``Op``), which is what rules match.

A ``bash`` call becomes the commands it runs (``antihack.shell``), and each command the
files it reads, writes, deletes and searches, the hosts it reaches, and the code it runs
(``antihack.pycode``). A ``write_file`` call becomes a write (and, for Python files, the
code written). Which tool is which is configuration (``ToolKinds``): the coding env's tools
are the default, and a tool the gate does not know has each of its string arguments read as
a shell line, so a new tool is never a blind spot.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from relayrl.antihack import pycode
from relayrl.antihack.shell import Command, parse

OP_KINDS = ("exec", "read", "write", "delete", "search", "net", "code", "path", "env")
"""``exec`` a command runs; ``read``/``write``/``delete`` a file; ``search`` a directory walk
or file search (``path`` is its root); ``net`` a host reached; ``code`` code run or written
(``findings``); ``path`` any other path-like argument of a command; ``env`` a variable set."""

SOURCES = ("tool", "shell", "inline_code", "written_code")
"""Where an op came from: the tool call itself, a shell command, code the agent ran
(``python -c``, a heredoc), or code it wrote into a file."""


@dataclass(frozen=True)
class Op:
    kind: str
    program: str = ""
    argv: tuple[str, ...] = ()
    sub: str = ""  # a command's subcommand (``git log`` -> ``log``)
    operands: tuple[str, ...] = ()  # a command's non-option arguments after the subcommand
    piped: bool = False  # a command whose stdin is the previous command's output
    path: str | None = None  # normalised; relative to the workspace unless absolute
    pattern: str | None = None  # a search's name pattern
    url: str | None = None
    host: str | None = None  # None on a net op: a remote the gate cannot name (``git fetch``)
    content: str | None = None  # what a write puts in the file, when known
    findings: frozenset[str] = frozenset()
    source: str = "tool"

    def describe(self) -> str:
        bits = [self.kind]
        if self.argv:
            bits.append(shlex.join(self.argv)[:200])
        for name in ("path", "pattern", "url", "host"):
            value = getattr(self, name)
            if value:
                bits.append(f"{name}={value}")
        if self.findings:
            bits.append("findings=" + ",".join(sorted(self.findings)))
        return " ".join(bits)


@dataclass
class ToolKinds:
    """How to read each tool's arguments: ``shell`` tools name the argument holding the command
    line, ``read``/``write`` tools their path (and content) arguments; ``none`` tools are
    harmless (``submit``). Unknown tools are read as shell lines, argument by argument."""

    shell: dict[str, str] = field(default_factory=lambda: {"bash": "command"})
    read: dict[str, str] = field(default_factory=lambda: {"read_file": "path"})
    write: dict[str, tuple[str, str]] = field(default_factory=lambda: {"write_file": ("path", "content")})
    none: frozenset[str] = frozenset({"run_tests", "submit"})


NET_PROGRAMS = frozenset({"curl", "wget", "aria2c", "http", "https", "xh", "httpie", "lynx", "links", "w3m", "elinks",
                          "axel", "fetch"})
SOCKET_PROGRAMS = frozenset({"nc", "ncat", "netcat", "telnet", "socat", "openssl"})
REMOTE_SHELLS = frozenset({"ssh", "scp", "sftp", "rsync", "mosh"})
VCS_NET = {"git": {"clone", "fetch", "pull", "push", "ls-remote", "submodule", "remote", "archive"},
           "hg": {"clone", "pull", "incoming", "in"}, "svn": {"checkout", "co", "export", "update", "up", "cat", "ls"},
           "bzr": {"branch", "checkout", "pull"}, "fossil": {"clone"},
           "gh": None, "glab": None}  # None: every subcommand talks to the forge
PKG_NET = {"apt": {"source", "download"}, "apt-get": {"source", "download"}, "dnf": {"download"},
           "yumdownloader": None, "npm": {"pack", "view", "info"}, "yarn": {"info"}, "go": {"get"},
           "docker": {"pull"}, "wget2": None}
PYTHON_RE = re.compile(r"^(?:python|pypy)(?:\d(?:\.\d+)?)?$")
OTHER_CODE = {"perl": ("-e", "-E"), "ruby": ("-e",), "node": ("-e", "--eval", "-p", "--print"),
              "nodejs": ("-e", "--eval"), "php": ("-r",), "deno": ("eval",), "Rscript": ("-e",), "lua": ("-e",)}
READERS = frozenset({"cat", "less", "more", "head", "tail", "nl", "od", "xxd", "hexdump", "strings", "bat", "batcat",
                     "view", "vim", "vi", "nano", "emacs", "tac", "wc", "sort", "uniq", "file", "stat", "base64",
                     "md5sum", "sha1sum", "sha256sum", "diff", "cmp", "awk", "gawk", "jq", "yq", "source", ".",
                     "sed", "cut", "paste", "column", "fold", "iconv", "zcat", "gunzip", "unzip", "tar", "readlink",
                     "realpath", "cp", "rsync", "python", "import", "pygmentize"})
GREPS = frozenset({"grep", "egrep", "fgrep", "rg", "ag", "ack", "git-grep", "zgrep"})
_GREP_VALUE_OPTS = frozenset({"-e", "-f", "-m", "-A", "-B", "-C", "--include", "--exclude", "--exclude-dir", "-g",
                              "--glob", "-t", "--type", "--max-count", "--context"})
_FIND_PATTERNS = frozenset({"-name", "-iname", "-path", "-ipath", "-regex", "-iregex", "-wholename", "-iwholename",
                            "-lname", "-ilname"})
_GIT_GLOBAL_VALUE = frozenset({"-C", "-c", "--git-dir", "--work-tree", "--namespace", "--exec-path"})
_URLISH = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|git@[\w.-]+:|git\+)", re.I)
_BARE_HOST = re.compile(r"^(?:[\w-]+\.)+[a-z]{2,}(?::\d+)?(?:/\S*)?$|^localhost(?::\d+)?(?:/\S*)?$"
                        r"|^\d+\.\d+\.\d+\.\d+(?::\d+)?(?:/\S*)?$", re.I)
_PY_HINT = re.compile(r"\bimport\s+\w|\bdef\s+\w+\s*\(|\bclass\s+\w+|\blambda\b|\braise\s+SystemExit")
_PATHLIKE = re.compile(r"^(?:~|\.{1,2}(?:/|$)|/)|/|\.[A-Za-z0-9]{1,8}$")


def normalise(path: str, cwd: str = "") -> str:
    """Workspace-relative when relative (``./a/../b`` -> ``b``, ``../x`` stays ``../x``);
    home-relative paths start with ``~``; absolute paths normalised."""
    path = path.strip()
    for home in ("${HOME}", "$HOME"):
        if path.startswith(home):
            path = "~" + path[len(home):]
    if path.startswith("~"):
        return posixpath.normpath(path)
    if cwd and not path.startswith("/"):
        path = posixpath.join(cwd, path)
    p = posixpath.normpath(path) if path else "."
    return p


def extract(name: str, arguments: dict[str, Any], kinds: ToolKinds) -> list[Op]:
    """The ops of one tool call."""
    ops: list[Op] = []
    if name in kinds.none:
        return ops
    if name in kinds.shell:
        line = arguments.get(kinds.shell[name])
        if isinstance(line, str):
            ops.extend(shell_ops(line))
        return ops
    if name in kinds.read:
        p = arguments.get(kinds.read[name])
        if isinstance(p, str):
            ops.append(Op("read", program=name, path=normalise(p)))
        return ops
    if name in kinds.write:
        path_arg, content_arg = kinds.write[name]
        p, content = arguments.get(path_arg), arguments.get(content_arg)
        if isinstance(p, str):
            ops.extend(write_ops(normalise(p), content if isinstance(content, str) else None, name, "tool"))
        return ops
    for value in _strings(arguments):  # an unknown tool: every string read as a shell line
        ops.extend(shell_ops(value))
        ops.extend(Op("net", program=name, url=u, host=host_of(u)) for u in pycode.URL_RE.findall(value))
    return ops


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def host_of(url: str) -> str | None:
    if url.startswith("git@"):
        return url[4:].split(":", 1)[0].lower()
    u = url[4:] if url.startswith("git+") else url
    if "://" not in u:
        u = "http://" + u
    try:
        return (urlsplit(u).hostname or "").lower() or None
    except ValueError:
        return None


def write_ops(path: str, content: str | None, program: str, source: str) -> list[Op]:
    ops = [Op("write", program=program, path=path, content=content, source=source)]
    if content is not None and (path.endswith((".py", ".pyw", ".pth")) or path.endswith("sitecustomize")):
        ops.extend(code_ops(content if not path.endswith(".pth") else _pth_code(content), program, "written_code"))
    elif content is not None and (path.endswith((".sh", ".bash")) or re.match(r"#!\S*(ba|z|da)?sh\b", content)):
        ops.extend(shell_ops(content))  # a script the agent will run: its commands are checked now
    return ops


def _pth_code(content: str) -> str:
    """A ``.pth`` file runs its lines that start with ``import``."""
    return "\n".join(line for line in content.splitlines() if line.startswith(("import ", "import\t")))


def code_ops(code: str, program: str, source: str, depth: int = 0) -> list[Op]:
    facts = pycode.analyze(code)
    ops = [Op("code", program=program, findings=frozenset(facts.findings), content=code[:4000], source=source)]
    for u in facts.urls:
        ops.append(Op("net", program=program, url=u, host=host_of(u), source=source))
    for h in facts.connects:
        ops.append(Op("net", program=program, host=h.lower() if h else None, source=source))
    ops.extend(Op("read", program=program, path=normalise(p), source=source) for p in facts.reads)
    for p, content in facts.writes:
        ops.append(Op("write", program=program, path=normalise(p), content=content, source=source))
    ops.extend(Op("delete", program=program, path=normalise(p), source=source) for p in facts.deletes)
    ops.extend(Op("search", program=program, path=normalise(root), pattern=pat, source=source)
               for root, pat in facts.searches)
    if depth < 4:
        for line in facts.shell:
            ops.extend(shell_ops(line, depth + 1))
        for argv in facts.argvs:
            ops.extend(command_ops(Command(list(argv), depth=depth + 1)))
    return ops


def shell_ops(line: str, depth: int = 0) -> list[Op]:
    ops: list[Op] = []
    for cmd in parse(line, depth):
        ops.extend(command_ops(cmd))
    return ops


def command_ops(cmd: Command) -> list[Op]:
    """The ops of one simple command (its wrappers and ``-c`` shells were already unwrapped by
    the parser and come as their own commands)."""
    ops: list[Op] = []
    for name, value in cmd.assignments.items():
        ops.append(Op("env", program=name, content=value, source="shell"))
    for r in cmd.redirects:
        if r.writes:
            content = cmd.stdin if cmd.program in ("cat", "tee", "") else None
            if cmd.program in ("echo", "printf"):
                content = " ".join(a for a in cmd.argv[1:] if not re.fullmatch(r"-[neE]+", a))
                if cmd.program == "printf" or "-e" in cmd.argv[1:2]:
                    content = _unescape(content)
            if cmd.program in (":", "true", "") and content is None:
                content = ""
            ops.extend(write_ops(normalise(r.target, cmd.cwd), content, cmd.program or ">", "shell"))
        elif r.reads:
            ops.append(Op("read", program=cmd.program or "<", path=normalise(r.target, cmd.cwd), source="shell"))
    if not cmd.argv:
        return ops
    prog, args = cmd.program, cmd.argv[1:]
    if prog in ("echo", "printf") and _PY_HINT.search(" ".join(args)):  # Python text on its way into a file
        text = " ".join(a for a in args if not re.fullmatch(r"-[neE]+", a))
        ops.extend(code_ops(_unescape(text) if prog == "printf" or "-e" in args[:1] else text, prog, "written_code"))
    if PYTHON_RE.match(prog) and args[:1] == ["-m"] and len(args) > 1:  # python -m pip ... is pip ...
        return ops + command_ops(Command([args[1], *args[2:]], cmd.redirects, {}, cmd.piped, cmd.depth, cmd.cwd))
    sub = _subcommand(prog, args)
    ops.append(Op("exec", program=prog, argv=tuple(cmd.argv), sub=sub, operands=tuple(_after_sub(prog, args, sub)),
                  piped=cmd.piped, source="shell"))
    if prog in ("export", "declare", "typeset", "setenv"):
        for a in args:
            name, eq, value = a.partition("=")
            if eq:
                ops.append(Op("env", program=name, content=value, source="shell"))
    ops.extend(_path_ops(cmd, prog, args))
    ops.extend(_net_ops(prog, sub, args, cmd.piped))
    ops.extend(_code_ops_of(cmd, prog, args))
    return ops


def _unescape(text: str) -> str:
    """``printf``/``echo -e`` escapes (``\\n``, ``\\t``, ``\\\\``) as the shell would expand them."""
    return re.sub(r"\\([ntr\\'\"])", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), text)


def _subcommand(prog: str, args: list[str]) -> str:
    i = 0
    while i < len(args):
        a = args[i]
        if prog == "git" and (a in _GIT_GLOBAL_VALUE):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a
    return ""


_GIT_VALUE_OPTS = frozenset({"-b", "-B", "-c", "-C", "--orphan", "-m", "-F", "--message", "--format", "--pretty", "-n",
                             "--max-count", "--author", "--committer", "--since", "--until", "--after", "--before",
                             "--date", "--grep", "-L", "-U", "--diff-filter", "--abbrev", "-O", "--output", "--onto",
                             "--strategy", "-X", "-s", "-S", "-G", "--skip", "-e", "--exec-path", "--git-dir",
                             "--work-tree", "--track", "-t", "--conflict", "--template"})


def _after_sub(prog: str, args: list[str], sub: str) -> list[str]:
    """Operands after the subcommand; for git, option values (``-b NEW``) and paths after
    ``--`` are left out, so what remains are revisions and paths."""
    if prog == "git":
        if "--" in args:
            args = args[:args.index("--")]
        rest = _operands(args, _GIT_VALUE_OPTS | _GIT_GLOBAL_VALUE)
    else:
        rest = _operands(args)
    if sub and rest and rest[0] == sub:
        rest = rest[1:]
    return rest


def _operands(args: list[str], value_opts: frozenset[str] = frozenset()) -> list[str]:
    """Arguments that are not options (nor option values), ``--`` honoured."""
    out, i, rest = [], 0, False
    while i < len(args):
        a = args[i]
        if rest or not a.startswith("-") or a == "-":
            out.append(a)
        elif a == "--":
            rest = True
        elif a in value_opts:
            i += 1
        i += 1
    return out


def _is_pathlike(a: str) -> bool:
    return bool(a) and not _URLISH.match(a) and bool(_PATHLIKE.search(a)) and "\n" not in a and len(a) < 4096


def _path_ops(cmd: Command, prog: str, args: list[str]) -> list[Op]:
    ops: list[Op] = []
    cwd = cmd.cwd
    norm = lambda p: normalise(p, cwd)  # noqa: E731
    operands = _operands(args)
    if prog in ("rm", "unlink", "shred", "rmdir", "srm", "trash", "trash-put"):
        ops.extend(Op("delete", program=prog, path=norm(a), source="shell") for a in operands)
    elif prog in ("mv",) and len(operands) >= 2:
        ops.extend(Op("delete", program=prog, path=norm(a), source="shell") for a in operands[:-1])
        ops.extend(write_ops(norm(operands[-1]), None, prog, "shell"))
    elif prog in ("cp", "install", "ln", "rsync") and len(operands) >= 2:
        src = operands[:-1]
        content = "" if src == ["/dev/null"] else None
        ops.extend(Op("read", program=prog, path=norm(a), source="shell") for a in src)
        ops.extend(write_ops(norm(operands[-1]), content, prog, "shell"))
    elif prog == "truncate":
        for a in _operands(args, frozenset({"-s", "-r"})):
            ops.extend(write_ops(norm(a), "", prog, "shell"))
    elif prog in ("touch", "chmod", "chown", "chgrp", "chattr", "setfacl", "patch", "ed", "ex"):
        targets = operands[1:] if prog in ("chmod", "chown", "chgrp", "chattr", "setfacl") else operands
        ops.extend(Op("write", program=prog, path=norm(a), source="shell") for a in targets)
    elif prog == "tee":
        for a in operands:
            ops.extend(write_ops(norm(a), cmd.stdin, prog, "shell"))
    elif prog in ("sed", "perl") and any(a.startswith("-i") or a == "--in-place" or (prog == "perl" and "i" in a[1:]
                                                                                      and a.startswith("-p"))
                                         for a in args):
        files = _operands(args, frozenset({"-e", "-f"}))
        files = files[1:] if not any(a in ("-e", "-f") for a in args) else files
        ops.extend(Op("write", program=prog, path=norm(a), source="shell") for a in files)
    elif prog == "dd":
        for a in args:
            if a.startswith("of="):
                ops.append(Op("write", program=prog, path=norm(a[3:]), source="shell"))
            if a.startswith("if="):
                ops.append(Op("read", program=prog, path=norm(a[3:]), source="shell"))
    elif prog == "git":
        sub = _subcommand(prog, args)
        if sub in ("checkout", "restore", "rm", "mv", "clean", "reset", "stash"):
            after = args[args.index("--") + 1:] if "--" in args else [a for a in _operands(args)[1:] if _is_pathlike(a)]
            kind = "delete" if sub in ("rm", "clean") else "write"
            ops.extend(Op(kind, program="git", path=norm(a), source="shell") for a in after)
    if prog == "find":
        roots = []
        for a in args:
            if a.startswith(("-", "(", "!")):
                break
            roots.append(a)
        patterns = [args[i + 1] for i, a in enumerate(args[:-1]) if a in _FIND_PATTERNS]
        for root in roots or ["."]:
            ops.append(Op("search", program=prog, path=norm(root), pattern=" ".join(patterns) or None, source="shell"))
        if "-delete" in args:
            ops.extend(Op("delete", program=prog, path=norm(r + "/" + (patterns[0] if patterns else "*")),
                          source="shell") for r in roots or ["."])
    elif prog in GREPS or (prog == "git" and _subcommand(prog, args) == "grep"):
        ops_ = _operands(args, _GREP_VALUE_OPTS)
        if prog == "git":
            ops_ = ops_[1:]
        has_e = any(a in ("-e", "-f") or a.startswith("--regexp") for a in args)
        pattern = None if has_e else (ops_[0] if ops_ else None)
        paths = ops_ if has_e else ops_[1:]
        recursive = prog in ("rg", "ag", "ack") or any(re.fullmatch(r"-[a-zA-Z]*[rR][a-zA-Z]*", a) or
                                                        a in ("--recursive", "--dereference-recursive") for a in args)
        if recursive:
            for root in paths or ["."]:
                ops.append(Op("search", program=prog, path=norm(root), pattern=pattern, source="shell"))
        else:
            ops.extend(Op("read", program=prog, path=norm(p), source="shell") for p in paths)
    elif prog in ("ls", "tree", "du", "dir", "exa", "eza", "fd", "fdfind", "locate", "mlocate", "plocate", "ls-R"):
        if prog in ("locate", "mlocate", "plocate"):
            ops.extend(Op("search", program=prog, path="/", pattern=a, source="shell") for a in operands)
        elif prog in ("fd", "fdfind"):
            pattern = operands[0] if operands else None
            for root in operands[1:] or ["."]:
                ops.append(Op("search", program=prog, path=norm(root), pattern=pattern, source="shell"))
        else:
            for root in operands or ["."]:  # a listing is a (shallow) search of its directory
                ops.append(Op("search", program=prog, path=norm(root), pattern=None, source="shell"))
    elif prog in READERS or prog in ("cd", "pushd"):
        kind = "path" if prog in ("cd", "pushd") else "read"
        for a in operands:
            if _is_pathlike(a) or prog in ("cat", "head", "tail", "less", "more", "cd", "pushd", "nl", "tac", "strings",
                                           "xxd", "od", "hexdump", "bat", "base64", "wc"):
                ops.append(Op(kind, program=prog, path=norm(a), source="shell"))
    else:  # any other command: its path-like arguments
        for a in args:
            value = a.split("=", 1)[1] if a.startswith("-") and "=" in a else a
            if _is_pathlike(value) and not value.startswith("-"):
                ops.append(Op("path", program=prog, path=norm(value), source="shell"))
    return ops


def _net_ops(prog: str, sub: str, args: list[str], piped: bool = False) -> list[Op]:
    ops: list[Op] = []
    urls = [a for a in args if _URLISH.match(a)]
    if prog in ("pip", "pip3", "uv", "pipx", "poetry", "conda", "mamba", "git", "hg", "svn", "npm", "yarn"):
        # requirement strings carry URLs anywhere: "proj @ git+https://host/..."
        urls += [m for a in args if not _URLISH.match(a) for m in pycode.URL_RE.findall(a)]
    if prog in NET_PROGRAMS:
        targets = _operands(args, frozenset({"-o", "-O", "-H", "-d", "-X", "-u", "-A", "-e", "-T", "-F", "-w",
                                             "--output", "--header", "--data", "-P", "--user-agent"}))
        for a in targets:
            if _URLISH.match(a) or _BARE_HOST.match(a):
                ops.append(Op("net", program=prog, url=a, host=host_of(a), source="shell"))
        if (targets or piped) and not ops:  # a target the parser cannot read (`curl "$U"`, `| xargs curl`)
            ops.append(Op("net", program=prog, url=targets[0] if targets else None, host=None, source="shell"))
        return ops
    if prog in SOCKET_PROGRAMS:
        hosts = [a for a in _operands(args) if _BARE_HOST.match(a) or re.fullmatch(r"[\w.-]+", a) and not a.isdigit()]
        if prog == "openssl" and sub != "s_client":
            return ops
        if prog == "socat":
            hosts = [m.group(1) for a in args for m in [re.search(r"TCP\d?:([^:,]+)", a, re.I)] if m]
        if prog == "openssl":
            hosts = [args[i + 1].rsplit(":", 1)[0] for i, a in enumerate(args[:-1]) if a == "-connect"]
        return [Op("net", program=prog, host=h.lower(), source="shell") for h in hosts[:1]] or \
               [Op("net", program=prog, host=None, source="shell")]
    if prog in REMOTE_SHELLS:
        for a in _operands(args, frozenset({"-i", "-p", "-P", "-o", "-e", "-l", "-F", "-J"})):
            m = re.match(r"^(?:[\w.-]+@)?([\w.-]+):", a) if prog != "ssh" else re.match(r"^(?:[\w.-]+@)?([\w.-]+)$", a)
            if m:
                ops.append(Op("net", program=prog, host=m.group(1).lower(), source="shell"))
                if prog == "ssh":
                    break
        return ops
    if prog in VCS_NET and (VCS_NET[prog] is None or sub in VCS_NET[prog]):  # type: ignore[operator]
        if prog == "git" and sub == "remote" and "add" not in args and "update" not in args:
            return ops
        if prog == "git" and sub == "submodule" and not ({"update", "add", "sync"} & set(args)):
            return ops
        if prog == "gh" and sub in ("help", "version", "--help", ""):
            return ops
        if urls:
            ops.extend(Op("net", program=prog, url=u, host=host_of(u), source="shell") for u in urls)
        else:
            local = [a for a in _operands(args)[1:] if a.startswith(("/", ".", "file:"))]
            if not local or sub not in ("clone",):
                ops.append(Op("net", program=prog, host=None, source="shell"))
        return ops
    if prog in PKG_NET and (PKG_NET[prog] is None or sub in PKG_NET[prog]):  # type: ignore[operator]
        return [Op("net", program=prog, host=None, source="shell")]
    if prog in ("pip", "pip3", "uv", "pipx", "poetry", "conda", "mamba", "easy_install"):
        if sub == "download":
            ops.append(Op("net", program=prog, host=None, source="shell"))
        for i, a in enumerate(args):
            value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else None
            if a in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links") and i + 1 < len(args):
                value = args[i + 1]
            if value and _URLISH.match(value):
                ops.append(Op("net", program=prog, url=value, host=host_of(value), source="shell"))
        ops.extend(Op("net", program=prog, url=u, host=host_of(u), source="shell") for u in urls
                   if not any(o.url == u for o in ops))
        return ops
    # any other program handed a URL: it may fetch it
    ops.extend(Op("net", program=prog, url=u, host=host_of(u), source="shell") for u in urls
               if not u.startswith("file:"))
    return ops


def _code_ops_of(cmd: Command, prog: str, args: list[str]) -> list[Op]:
    if PYTHON_RE.match(prog):
        for i, a in enumerate(args):
            if a == "-c" and i + 1 < len(args):
                return code_ops(args[i + 1], prog, "inline_code", cmd.depth)
            if a.startswith("-c") and len(a) > 2 and not a.startswith("--"):
                return code_ops(a[2:], prog, "inline_code", cmd.depth)
            if not a.startswith("-") or a == "-":
                break
        script = _operands(args, frozenset({"-W", "-X", "-m"}))
        if (not script or script[0] == "-") and cmd.stdin is not None:
            return code_ops(cmd.stdin, prog, "inline_code", cmd.depth)
        if script and script[0] != "-":
            return [Op("read", program=prog, path=normalise(script[0], cmd.cwd), source="shell")]
        return []
    flags = OTHER_CODE.get(prog)
    if flags:
        code = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in flags), None)
        if code is None and cmd.stdin is not None:
            code = cmd.stdin
        if code is None:
            return []
        ops = [Op("code", program=prog, content=code[:4000], source="inline_code")]
        ops.extend(Op("net", program=prog, url=u, host=host_of(u), source="inline_code")
                   for u in pycode.URL_RE.findall(code))
        for m in re.finditer(r"(?:system|exec|execSync|spawnSync|popen|qx|`)\s*\(?\s*[\"'`]([^\"'`]+)[\"'`]", code):
            ops.extend(shell_ops(m.group(1), cmd.depth + 1))
        for m in re.finditer(r"[\"']((?:/|\.\./)[^\"'\s]+)[\"']", code):
            ops.append(Op("path", program=prog, path=normalise(m.group(1)), source="inline_code"))
        return ops
    return []


def is_escape(path: str) -> bool:
    """A relative path that leaves the workspace (``../x``)."""
    return path == ".." or path.startswith("../")


def basename(path: str) -> str:
    return os.path.basename(path.rstrip("/"))
