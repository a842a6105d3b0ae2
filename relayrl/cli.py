"""The ``relayrl`` command.

    relayrl train CONFIG.yaml [dotted.key=value ...]     train (resume with run.resume=true)
    relayrl distill CONFIG.yaml [dotted.key=value ...]   distil the distill.teachers into the student
    relayrl eval CONFIG.yaml [--checkpoint DIR] [--tasks F] [--samples K]
                                                        pass@k of a checkpoint through the agent loop
    relayrl eval CONFIG.yaml --distill [--student DIR]  per-domain metrics of the student and each teacher
    relayrl eval-diff BEFORE.jsonl AFTER.jsonl          what changed between two evaluations
    relayrl report RUN_DIR                              PNG plots of a run's metrics
    relayrl config show CONFIG.yaml [dotted.key=value]  the validated config, every default filled in
    relayrl convert-model smollm2 [--cache-dir DIR]     convert the bundled SmolLM2 once
    relayrl envs list                                   the registered environments
    relayrl envs check NAME_OR_PATH [--kwargs YAML]     run the env contract on an environment
    relayrl sandbox-server --host H --port P            serve sandboxes to other hosts (token auth)
    relayrl antihack check [--rules-only] [--config F]  verdicts for JSON-line tool calls on stdin

Exit codes: 0 success; 2 a user mistake (bad config, missing file, bad argument), reported as
one paragraph naming the key and the fix, without a traceback; 3 the work could not be done
(``relayrl eval``: episodes whose engine or sandbox failed; the message names them); 130
interrupted (Ctrl-C); 1 an unexpected error, with its traceback (a bug to report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relayrl.config import Config, ConfigError, dump_config, load_config

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _check_directory(path: Path, key: str) -> None:
    """Raise ConfigError naming ``key`` when ``path`` cannot be (or become) a directory because
    it, or a directory it would be created under, is a file: caught here in one sentence, not
    as a ``NotADirectoryError`` once the work has started."""
    for p in (path, *path.parents):
        if p.exists():
            if p.is_dir():
                return
            where = f"{path} is a file" if p == path else f"{path} cannot be created: {p} is a file"
            raise ConfigError(f"{key}: {where}, not a directory. Give a directory path (it is created if missing).")


def _check_run_dir(cfg: Config) -> None:
    _check_directory(Path(cfg.run.output_dir).expanduser(), "run.output_dir")
    if cfg.run.run_dir.exists() and not cfg.run.run_dir.is_dir():
        raise ConfigError(f"run.name: {cfg.run.run_dir} is a file, not a run directory; pick another run.name "
                          "or run.output_dir.")


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _check_run_dir(cfg)
    from relayrl.rl.driver import train  # heavy (torch, ray): only when training

    train(cfg)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _check_run_dir(cfg)
    from relayrl.opd.distill import STUDENT_DIR, distill  # heavy (torch, ray): only when distilling

    run_dir = distill(cfg)
    print(run_dir / STUDENT_DIR)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    kind = "distill" if args.distill or args.student else cfg.eval.kind
    if kind == "auto":
        kind = "distill" if cfg.distill.teachers else "agent"
    if kind == "distill":
        from relayrl.opd.evaluate import evaluate, format_report, write_report

        report = evaluate(cfg, args.student or args.checkpoint)
        print(format_report(report))
        out = Path(args.out) if args.out else cfg.run.run_dir / "eval.json"
        print(write_report(report, out))
        return 0
    from relayrl.rl.evaluation import EvalFailed, evaluate_agent, format_summary

    try:
        summary, path = evaluate_agent(cfg, args.checkpoint, args.tasks, args.samples, args.limit, args.out)
    except EvalFailed as e:
        print(f"relayrl eval: error: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    print(format_summary(summary, f"relayrl eval: {args.checkpoint or cfg.model.path}"))
    print(path)
    return 0


def _cmd_eval_diff(args: argparse.Namespace) -> int:
    from relayrl.rl.evaluation import diff_evals, read_records

    print(diff_evals(read_records(args.before), read_records(args.after)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from relayrl.report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def _cmd_convert_model(args: argparse.Namespace) -> int:
    from relayrl.model import default_cache_dir, ensure_smollm2

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    _check_directory(cache, "--cache-dir" if args.cache_dir else f"--cache-dir (default {cache})")
    print(ensure_smollm2(cache))
    return 0


def _cmd_envs_list(args: argparse.Namespace) -> int:
    import relayrl.envs.coding  # noqa: F401  (registers the built-in envs)
    import relayrl.envs.toy  # noqa: F401
    from relayrl.registry import envs

    for name in envs.names():
        print(name)
    return 0


def _cmd_envs_check(args: argparse.Namespace) -> int:
    from relayrl.envs.check import parse_kwargs, print_results, run_check

    results, num_tasks = run_check(args.env, parse_kwargs(args.kwargs), args.tasks,
                                   None if args.all_tasks else args.limit)
    print_results(args.env, results, num_tasks)
    return 0 if all(r.ok for r in results) else 1


def _cmd_sandbox_server(args: argparse.Namespace) -> int:
    import errno
    import os
    import socket

    from relayrl.envs.remote_sandbox import TOKEN_ENV, is_loopback, serve
    from relayrl.envs.sandbox import SandboxLimits

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: must be between 0 and 65535 (0 picks a free port), got {args.port}")
    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host: cannot resolve {args.host!r} ({e.strerror}); give an address of this host "
                          "(e.g. 0.0.0.0 for every interface, 127.0.0.1 for this machine only) or a name "
                          "that resolves to one") from None
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token and not args.no_auth:
        raise ConfigError(f"--token: a sandbox server needs a token (--token or ${TOKEN_ENV}); "
                          "for a loopback-only server without one, pass --no-auth")
    if args.no_auth and not is_loopback(args.host):
        raise ConfigError(f"--no-auth: only allowed on a loopback --host, not {args.host}; give a --token")
    for flag, value in (("--max-sandboxes", args.max_sandboxes), ("--idle-ttl", args.idle_ttl),
                        ("--cpu-seconds", args.cpu_seconds), ("--memory-mb", args.memory_mb),
                        ("--max-processes", args.max_processes), ("--timeout", args.timeout)):
        if not 0 < value < float("inf"):  # NaN fails this too
            raise ConfigError(f"{flag}: must be a positive, finite number, got {value}")
    limits = SandboxLimits(cpu_seconds=args.cpu_seconds, memory_bytes=args.memory_mb << 20,
                           timeout_s=args.timeout, max_processes=args.max_processes)
    try:
        serve(args.host, args.port, None if args.no_auth else token, args.max_sandboxes, args.idle_ttl, limits,
              args.root)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise ConfigError(f"--host/--port: cannot listen on {args.host}:{args.port} ({e.strerror}); "
                              "pick a free --port or an address of this host") from None
        raise
    return 0


def _cmd_antihack_check(args: argparse.Namespace) -> int:
    from relayrl.antihack.cli import run_check

    return run_check(args.config, args.rules_only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayrl",
        description="Reinforcement learning of LLM coding agents over long horizons.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    overrides_help = "dotted.key=value overrides, e.g. train.steps=5 rollout.group_size=4"

    p = sub.add_parser("train", help="train a policy from a YAML config")
    p.add_argument("config", metavar="CONFIG", help="path of a YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("distill", help="on-policy distillation of many teachers into the student")
    p.add_argument("config", metavar="CONFIG", help="path of a YAML config, e.g. configs/distill_10_experts.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("eval", help="evaluate a checkpoint through the agent loop (pass@k), or a distilled student")
    p.add_argument("config", metavar="CONFIG", help="the job YAML (its engine, env, rollout and eval sections)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    p.add_argument("--checkpoint", default=None,
                   help="the model to evaluate: an HF directory, a checkpoint step directory or a run directory "
                        "(its newest checkpoint); default model.path")
    p.add_argument("--tasks", default=None, help="held-out tasks: a .jsonl/.parquet file or a set name such as "
                                                 "pyfunc:heldout (default eval.tasks, else env.tasks)")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="episodes per task, for pass@k (default eval.samples; > 1 needs eval.temperature > 0)")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N tasks")
    p.add_argument("--out", default=None,
                   help="the per-episode JSONL (default <run_dir>/eval/<checkpoint>.jsonl; the summary goes "
                        "beside it as .summary.json); for --distill the JSON report (default <run_dir>/eval.json)")
    p.add_argument("--distill", action="store_true",
                   help="the distillation report instead: per-domain metrics of the student and each teacher")
    p.add_argument("--student", default=None,
                   help="with --distill: the student checkpoint (default <run_dir>/student if it exists, "
                        "else model.path)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("eval-diff", help="what changed between two evaluations of the same tasks")
    p.add_argument("before", metavar="BEFORE", help="an evaluation JSONL (relayrl eval, or <run_dir>/eval/step_*.jsonl)")
    p.add_argument("after", metavar="AFTER", help="another evaluation JSONL of the same tasks")
    p.set_defaults(func=_cmd_eval_diff)

    p = sub.add_parser("report", help="write PNG plots of a run's metrics.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (<run.output_dir>/<run.name>)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the validated config with every default filled in")
    show.add_argument("config", metavar="CONFIG", help="path of a YAML config")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    show.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("envs", help="list environments, run the contract checks on one")
    envs_sub = p.add_subparsers(dest="envs_command", metavar="ACTION", required=True)
    ls = envs_sub.add_parser("list", help="the registered environment names")
    ls.set_defaults(func=_cmd_envs_list)
    check = envs_sub.add_parser("check", help="run the env contract (and its sandbox's) on an environment")
    check.add_argument("env", metavar="NAME_OR_PATH", help="a registered name (coding, toy_echo) or 'pkg.mod:Class'")
    check.add_argument("--kwargs", default=None, help="constructor kwargs as YAML/JSON, e.g. '{reward: all_pass}'")
    check.add_argument("--tasks", default=None, help="a .jsonl/.parquet task file (default: the env's own tasks)")
    check.add_argument("--limit", type=int, default=3, help="check the first N tasks (default 3)")
    check.add_argument("--all-tasks", action="store_true", help="check every task")
    check.set_defaults(func=_cmd_envs_check)

    p = sub.add_parser("sandbox-server", help="serve sandboxes over HTTP to rollout workers on other hosts")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="port (default 8700)")
    p.add_argument("--token", default=None, help="bearer token clients must send (default: $RELAYRL_SANDBOX_TOKEN)")
    p.add_argument("--no-auth", action="store_true", help="no token (loopback hosts only)")
    p.add_argument("--max-sandboxes", type=int, default=64, help="sandboxes open at once (default 64)")
    p.add_argument("--idle-ttl", type=float, default=900.0, help="close a sandbox unused this many seconds (default 900)")
    p.add_argument("--cpu-seconds", type=int, default=10, help="CPU seconds per command (default 10)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space per command in MiB (default 1024)")
    p.add_argument("--max-processes", type=int, default=64, help="processes per command (default 64)")
    p.add_argument("--timeout", type=float, default=30.0, help="wall-clock seconds per command (default 30)")
    p.add_argument("--root", default=None, help="directory for workspaces (default: the system temp dir)")
    p.set_defaults(func=_cmd_sandbox_server)

    p = sub.add_parser("antihack", help="the anti-hack gate: check tool calls")
    ah_sub = p.add_subparsers(dest="antihack_command", metavar="ACTION", required=True)
    check = ah_sub.add_parser("check", help="read JSON-line tool calls on stdin, write one verdict line each")
    check.add_argument("--rules-only", action="store_true", help="the rule stage alone: what it flags is blocked")
    check.add_argument("--config", default=None,
                       help="a job YAML: its antihack section (packs, paths, hosts, judge) and, for the "
                            "policy judge, its model.path")
    check.set_defaults(func=_cmd_antihack_check)

    p = sub.add_parser("convert-model", help="convert a bundled model to a cached safetensors checkpoint")
    p.add_argument("model", choices=["smollm2"], help="the bundled model (SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None,
                   help="where to cache it (default: $RELAYRL_CACHE or ~/.cache/relayrl)")
    p.set_defaults(func=_cmd_convert_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # usage errors: argparse prints them and exits 2
    # Overrides may come after options too (relayrl eval CONFIG --limit 4 run.name=x).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"relayrl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        hint = (
            " The run can be resumed from its last checkpoint with run.resume=true "
            f"(relayrl {args.command} {args.config} run.resume=true)."
            if args.command in ("train", "distill")
            else ""
        )
        print(f"\nrelayrl {args.command}: interrupted.{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
