"""The shell parser the rule stage reads commands with: hand-worked lines."""

from relayrl.antihack.shell import parse


def argvs(line: str) -> list[list[str]]:
    return [c.argv for c in parse(line)]


def test_operators_split_simple_commands():
    assert argvs("a 1 && b 2 || c; d | e & f") == [["a", "1"], ["b", "2"], ["c"], ["d"], ["e"], ["f"]]
    assert argvs("a\nb\n\nc") == [["a"], ["b"], ["c"]]
    piped = parse("cat x | sh")
    assert [c.piped for c in piped] == [False, True]


def test_quotes_and_escapes_are_resolved():
    assert argvs("""echo 'a b' "c $d" e\\ f "g\\"h" """) == [["echo", "a b", "c $d", "e f", 'g"h']]
    assert argvs("rm te''sts/x") == [["rm", "tests/x"]]
    assert argvs("echo 'unclosed") == [["echo", "unclosed"]]  # never raises


def test_comments_are_dropped_but_hashes_in_words_kept():
    assert argvs("ls # rm -rf tests\necho a#b") == [["ls"], ["echo", "a#b"]]


def test_redirections_and_fds():
    (cmd,) = parse("python x.py 2>&1 >out.txt <in.txt")
    assert cmd.argv == ["python", "x.py"]
    ops = [(r.op, r.target, r.writes, r.reads) for r in cmd.redirects]
    assert ops == [(">&", "1", False, False), (">", "out.txt", True, False), ("<", "in.txt", False, True)]
    (cmd,) = parse(": >tests/test_a.py")
    assert cmd.argv == [":"] and cmd.redirects[0].target == "tests/test_a.py"


def test_heredoc_bodies_attach_to_their_command():
    cmds = parse("cat > conftest.py <<'EOF'\nimport pytest\n$x\nEOF\necho done")
    assert cmds[0].argv == ["cat"] and cmds[0].stdin == "import pytest\n$x\n"
    assert cmds[1].argv == ["echo", "done"]
    (cmd,) = parse("python3 - <<-PY\n\tprint(1)\n\tPY")
    assert cmd.stdin == "print(1)\n"
    (cmd,) = parse("cat <<< 'hi there'")
    assert cmd.stdin == "hi there"


def test_substitutions_are_parsed_as_commands():
    cmds = argvs('echo "$(git log --all | head -1)" `curl x.io`')
    assert ["git", "log", "--all"] in cmds and ["head", "-1"] in cmds and ["curl", "x.io"] in cmds
    assert ["cat", "y"] in argvs("diff <(cat y) z")


def test_wrappers_and_nested_shells_are_looked_through():
    cmds = argvs("sudo -u root env A=1 timeout -s 9 5 nice -n 3 curl -s x.io")
    assert cmds[-1] == ["curl", "-s", "x.io"]
    assert ["rm", "-rf", "tests"] in argvs("bash -lc 'cd /tmp; rm -rf tests'")
    assert ["git", "reflog"] in argvs("eval git reflog")
    assert ["cat", "/*hidden*"] in argvs("find / -name '*hidden*' -exec cat {} \\;")
    assert ["rm", "{}"] in argvs("ls | xargs -I{} sh -c 'rm {}'")
    assert ["curl", "x.io"] in argvs("sh <<EOF\ncurl x.io\nEOF")
    assert ["ls", "/"] in argvs("ssh user@host ls /")


def test_variables_assigned_earlier_are_substituted():
    cmds = argvs("U=https://x.io/p; export D=/grader; curl $U && ls ${D}/tests")
    assert ["curl", "https://x.io/p"] in cmds and ["ls", "/grader/tests"] in cmds


def test_keywords_are_stripped_and_cd_is_tracked():
    assert ["rm", "tests/a.py"] in argvs("if true; then rm tests/a.py; fi")
    cmds = parse("cd tests && rm -f test_a.py")
    assert cmds[1].argv == ["rm", "-f", "test_a.py"] and cmds[1].cwd == "tests"


def test_depth_is_bounded():
    line = "echo x"
    for _ in range(20):
        line = f"bash -c {line!r}"
    cmds = parse(line)
    assert len(cmds) <= 10  # unwrapping stops; no recursion error
