"""User mistakes that once ended in a traceback or in a message that did not name the key
(issue 20, item 10): each is exit code 2 and one paragraph naming the key and the fix.

Run in-process through ``relayrl.cli.main``. The ``train`` cases stop in the start-up
checks: a guard fails the test if one got as far as starting Ray.
"""

from __future__ import annotations

import math

import pytest

from relayrl.cli import main
from relayrl.envs.sandbox import SandboxLimits


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a train command gets past its start-up checks."""
    from relayrl.rl.job import Job

    def refuse(self):
        raise AssertionError("the mistake was not caught before Ray started")

    monkeypatch.setattr(Job, "_start_ray", refuse)


def _user_error(capsys, argv: list[str], needles: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert len(err.strip().splitlines()) <= 4, err  # one paragraph, not a dump
    return err


# (id, files to write (name -> bytes), argv, text the message must contain)
CASES = [
    ("a_not_utf8", {"cfg.yaml": b"run:\n  name: caf\xe9\n"}, ["train", "cfg.yaml"],
     ["cfg.yaml", "not UTF-8", "line 2", "save it as UTF-8"]),
    ("d_output_dir_is_a_file", {"cfg.yaml": b"run:\n  output_dir: afile\n", "afile": b"x"},
     ["train", "cfg.yaml"], ["run.output_dir", "afile", "is a file"]),
    ("d_output_dir_under_a_file", {"cfg.yaml": b"run:\n  output_dir: afile/runs\n", "afile": b"x"},
     ["train", "cfg.yaml"], ["run.output_dir", "afile/runs", "afile is a file"]),
    ("e_port_out_of_range", {}, ["sandbox-server", "--token", "t", "--port", "70000"],
     ["--port", "70000", "65535"]),
    ("f_host_does_not_resolve", {}, ["sandbox-server", "--token", "t", "--port", "0",
                                     "--host", "no.such.host.invalid"],
     ["--host", "no.such.host.invalid", "cannot"]),
    ("g_cache_dir_is_a_file", {"afile": b"x"}, ["convert-model", "smollm2", "--cache-dir", "afile"],
     ["--cache-dir", "afile", "is a file"]),
    ("i_unknown_key_in_a_list_item",
     {"cfg.yaml": b"distill:\n  teachers:\n    - {name: a, path: b, domains: [x], wieght: 2}\n"},
     ["train", "cfg.yaml"],
     ["distill.teachers[0].wieght", "unknown key", "Known keys here: domains, name, path, weight."]),
    ("j_empty_file", {"cfg.yaml": b""}, ["train", "cfg.yaml"],
     ["cfg.yaml", "is empty", "configs/quickstart.yaml"]),
    ("j_only_comments", {"cfg.yaml": b"# nothing yet\n"}, ["config", "show", "cfg.yaml", "train.steps=2"],
     ["cfg.yaml", "is empty", "configs/quickstart.yaml"]),
]


@pytest.mark.parametrize("files,argv,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistakes_exit_2_naming_the_key(tmp_path, monkeypatch, capsys, no_ray, files, argv, needles):
    monkeypatch.chdir(tmp_path)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    _user_error(capsys, argv, needles)


def test_explicit_empty_mapping_is_all_defaults(tmp_path, capsys):
    """``{}`` says "all defaults" on purpose, unlike a file with nothing in it."""
    (tmp_path / "cfg.yaml").write_text("{}\n")
    assert main(["config", "show", str(tmp_path / "cfg.yaml")]) == 0
    assert "clip_high: 0.28" in capsys.readouterr().out


# Start-up checks of `relayrl train` on the coding env's sandbox spec (env.kwargs.sandbox).
SANDBOX_CASES = [
    ("b_remote_typo", "{kind: remote, url: 'http://127.0.0.1:9', tokn: x}",
     ["env.kwargs.sandbox", "unknown key(s) tokn", "known keys", "url", "token", "connect_timeout_s"]),
    ("c_kind_missing_module", "{kind: 'no_such_pkg.mod:Provider'}",
     ["env.kwargs.sandbox.kind", "cannot import 'no_such_pkg.mod:Provider'", "no_such_pkg"]),
    ("c_kind_missing_attribute", "{kind: 'relayrl.envs.sandbox:NoSuchProvider'}",
     ["env.kwargs.sandbox.kind", "NoSuchProvider"]),
    ("h_negative_timeout", "{timeout_s: -1}", ["env.kwargs.sandbox.timeout_s", "positive", "-1"]),
    ("h_memory_as_text", "{memory_bytes: 1GB}", ["env.kwargs.sandbox.memory_bytes", "whole number", "'1GB'"]),
]


@pytest.mark.parametrize("sandbox,needles", [c[1:] for c in SANDBOX_CASES], ids=[c[0] for c in SANDBOX_CASES])
def test_sandbox_spec_mistakes_stop_train_at_start_up(tmp_path, monkeypatch, capsys, no_ray, tiny_model_dir,
                                                      sandbox, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(
        f"run: {{output_dir: {tmp_path}/runs, name: r}}\nmodel: {{path: {tiny_model_dir}}}\n"
        f"env: {{name: coding, kwargs: {{sandbox: {sandbox}}}}}\n"
        "logging: {wandb: disabled, progress: false}\n")
    _user_error(capsys, ["train", "cfg.yaml"], needles)


@pytest.mark.parametrize("field,value,message", [
    ("timeout_s", -1, "timeout_s: must be a positive number of seconds, got -1"),
    ("timeout_s", 0.0, "timeout_s: must be a positive number of seconds, got 0.0"),
    ("timeout_s", math.inf, "timeout_s: must be a positive number of seconds, got inf"),
    ("timeout_s", math.nan, "timeout_s: must be a positive number of seconds, got nan"),
    ("timeout_s", "30", "timeout_s: must be a positive number of seconds, got '30'"),
    ("memory_bytes", "1GB", "memory_bytes: must be a whole number of bytes (e.g. 1073741824 for 1 GiB), got '1GB'"),
    ("memory_bytes", 1.5e9,
     "memory_bytes: must be a whole number of bytes (e.g. 1073741824 for 1 GiB), got 1500000000.0"),
    ("memory_bytes", 0, "memory_bytes: must be a positive whole number of bytes, got 0"),
    ("cpu_seconds", True, "cpu_seconds: must be a whole number of seconds, got True"),
    ("max_processes", -3, "max_processes: must be a positive whole number, got -3"),
    ("max_output_bytes", 0, "max_output_bytes: must be a positive whole number of bytes, got 0"),
    ("network", "no", "network: must be true or false, got 'no'"),
])
def test_sandbox_limits_reject_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError) as e:
        SandboxLimits(**{field: value})
    assert str(e.value) == message


def test_sandbox_limits_accept_good_values():
    limits = SandboxLimits(cpu_seconds=5, memory_bytes=2 << 30, timeout_s=1, max_output_bytes=1)
    assert limits.timeout_s == 1 and limits.memory_bytes == 2 << 30
    SandboxLimits()  # the defaults are valid
