"""``relayrl envs check``: run the contract checks on an environment, print a table."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import yaml

from relayrl.config import ConfigError, EnvConfig

from .contract import CheckResult, check_env, check_sandbox_provider


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--kwargs: not valid YAML/JSON ({e}). Example: --kwargs '{{num_turns: 3}}'") from None
    if not isinstance(value, dict):
        raise ConfigError("--kwargs: must be a mapping, e.g. --kwargs '{sandbox: {timeout_s: 10}}'")
    return value


def run_check(name: str, kwargs: dict[str, Any], tasks_path: str | None, limit: int | None,
              seed: int = 0) -> tuple[list[CheckResult], int]:
    """Resolve the env like ``relayrl train`` does, then run the env (and sandbox) contract.

    Returns (results, number of tasks checked). User mistakes raise ConfigError.
    """
    from relayrl.rl.data import load_tasks
    from relayrl.rollout.worker import make_env_factory

    env_cfg = EnvConfig(name=name, kwargs=kwargs, tasks=tasks_path)
    factory = make_env_factory(env_cfg)
    try:
        env_cls = type(factory())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--kwargs: the environment {name!r} rejected its arguments {kwargs}: {e}") from None
    tasks = load_tasks(env_cfg, env_cls, seed)
    if limit is not None:
        tasks = tasks[:limit]

    async def main() -> list[CheckResult]:
        results = [await _preflight(factory(), name)]
        results += await check_env(factory, tasks)
        spec = getattr(factory(), "sandbox_spec", False)
        if spec is not False:  # the env runs its tools in a sandbox: check that too
            from .coding import make_sandbox_provider

            provider = make_sandbox_provider(spec)
            try:
                results += [CheckResult(f"sandbox: {r.name}", r.ok, r.detail, r.seconds)
                            for r in await check_sandbox_provider(provider)]
            finally:
                await provider.close()
        return results

    return asyncio.run(main()), len(tasks)


async def _preflight(env: Any, name: str) -> CheckResult:
    """The env's own start-up check, as ``relayrl train`` runs it: a failure stops the check
    with its message (every episode would fail the same way, and the table would only say
    "reward 0.0"); its warnings go in the table."""
    start = time.monotonic()
    preflight = getattr(env, "preflight", None)
    if preflight is None:
        return CheckResult("preflight", True, "the env has none", 0.0)
    try:
        warnings = await preflight()
    except ValueError as e:
        raise ConfigError(f"the environment {name!r} failed its preflight check: {e}") from None
    return CheckResult("preflight", True, " ".join(warnings or []), time.monotonic() - start)


def print_results(name: str, results: list[CheckResult], num_tasks: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"relayrl envs check {name} ({num_tasks} task(s))")
    table.add_column("check")
    table.add_column("result")
    table.add_column("s", justify="right")
    table.add_column("detail", overflow="fold")
    for r in results:
        table.add_row(r.name, "[green]pass[/green]" if r.ok else "[red]FAIL[/red]", f"{r.seconds:.1f}",
                      r.detail if r.ok else r.detail.strip()[:2000])
    console = Console(width=160)
    console.print(table)
    failed = sum(not r.ok for r in results)
    console.print(f"{len(results) - failed} passed, {failed} failed")
