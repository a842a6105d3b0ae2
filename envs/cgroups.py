"""One cgroup per sandbox: memory, processes and CPU time bounded over all of a command's processes.

rlimits are per process: under ``memory_bytes`` = 128 MiB, four processes hold 4 x 127 MiB, and
under ``cpu_seconds`` = 10, sixty-four busy processes burn 640 CPU seconds. Where the host lets
relayrl make cgroups (as root, or in a delegated cgroup v2 subtree), each sandbox gets one, made
as a child of relayrl's own cgroup, and every command of the sandbox joins it before it starts
(so everything it forks is inside):

    memory     memory.max + memory.swap.max=0 (v2); memory.limit_in_bytes and
               memory.memsw.limit_in_bytes (v1): ``memory_bytes`` for all processes together,
               /tmp's tmpfs pages included; past it the kernel's OOM killer kills in the group
    pids       pids.max: ``max_processes`` plus the two processes that set the command up
    CPU time   read from cpu.stat usage_usec (v2) or cpuacct.usage (v1) while the command runs;
               the sandbox kills the command once all its processes together used more than
               ``cpu_seconds`` (polled, so it may overshoot by one poll period times the CPUs)

Cgroup v2 is used where its memory and pids controllers are available to relayrl's cgroup
(already enabled for its children, or enabled by relayrl); else v1, where the memory, pids and
cpuacct hierarchies are mounted and writable. Either all three bounds hold or none does:
``probe()`` returns None and the sandboxes fall back to rlimits alone (the provider's
``cgroup_limits`` is False, and the coding env reports ``env/cgroup_limits`` 0).

A cgroup is removed when its sandbox closes (its processes are killed first). A process
killed with SIGKILL leaves its sandboxes' empty cgroups behind (``relayrl-<pid>-<n>``);
they hold no process and no limit on anyone else.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "pids", "cpuacct")
V2_CONTROLLERS = ("memory", "pids")

_counter = itertools.count()
_probed: dict[str, CgroupParents | None] = {}


@dataclass(frozen=True)
class CgroupParents:
    """Where sandbox cgroups are made: one parent directory (v2), or one per controller (v1)."""

    version: Literal["v1", "v2"]
    dirs: dict[str, Path]
    """v2: {"unified": dir}; v1: {"memory": dir, "pids": dir, "cpuacct": dir} (co-mounted
    controllers share a dir)."""


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fs type, super options) of every cgroup mount of this process."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        out.append((fields[3], point, rest[0], set(rest[2].split(","))))
    return out


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for name in parts[1].split(",") if parts[1] else [""]:
            out[name] = parts[2]
    return out


def _under(mount_root: str, mount_point: str, path: str) -> Path | None:
    """The directory of cgroup ``path`` in a hierarchy mounted from ``mount_root`` at ``mount_point``."""
    if mount_root != "/" and not (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
        return None
    rel = path[len(mount_root.rstrip("/")):].lstrip("/") if mount_root != "/" else path.lstrip("/")
    d = Path(mount_point) / rel
    return d if d.is_dir() else None


def _candidates() -> list[CgroupParents]:
    own = _own_cgroups()
    found: list[CgroupParents] = []
    v1: dict[str, Path] = {}
    for root, point, fstype, opts in _mounts():
        if fstype == "cgroup2" and "" in own:
            d = _under(root, point, own[""])
            if d is not None:
                found.append(CgroupParents("v2", {"unified": d}))
        elif fstype == "cgroup":
            for c in V1_CONTROLLERS:
                if c in opts and c in own and c not in v1:
                    d = _under(root, point, own[c])
                    if d is not None:
                        v1[c] = d
    if all(c in v1 for c in V1_CONTROLLERS):
        found.append(CgroupParents("v1", v1))
    return found


def _usable_v2(parents: CgroupParents) -> bool:
    d = parents.dirs["unified"]
    try:
        available = set((d / "cgroup.controllers").read_text().split())
        if not set(V2_CONTROLLERS) <= available:
            return False
        enabled = set((d / "cgroup.subtree_control").read_text().split())
        missing = [c for c in V2_CONTROLLERS if c not in enabled]
        if missing:  # fails (EBUSY) when our cgroup holds processes and is not the root
            (d / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
        return True
    except OSError:
        return False


def probe() -> CgroupParents | None:
    """Where this process can make sandbox cgroups with every bound (checked once: a trial
    cgroup is made, limited and removed); None if nowhere."""
    if "parents" in _probed:
        return _probed["parents"]
    result = None
    for parents in sorted(_candidates(), key=lambda p: p.version != "v2"):
        if parents.version == "v2" and not _usable_v2(parents):
            continue
        try:
            trial = SandboxCgroup(parents, memory_bytes=64 << 20, max_processes=8)
        except OSError as e:
            log.debug("cgroup %s at %s not usable: %s", parents.version, parents.dirs, e)
            continue
        trial.remove()
        result = parents
        break
    if result is None:
        log.warning("relayrl sandboxes: no usable cgroup on this host (not root, or no memory/pids/cpu "
                    "accounting delegated): memory and CPU time are limited per process (rlimits) only, "
                    "so a command's processes together can use more than the limits")
    _probed["parents"] = result
    return result


class SandboxCgroup:
    """The cgroup(s) of one sandbox. Raises OSError when they cannot be made and limited."""

    def __init__(self, parents: CgroupParents, memory_bytes: int, max_processes: int) -> None:
        self.version = parents.version
        name = f"relayrl-{os.getpid()}-{next(_counter)}"
        self.dirs: dict[str, Path] = {c: d / name for c, d in parents.dirs.items()}
        made: list[Path] = []
        try:
            for d in dict.fromkeys(self.dirs.values()):  # co-mounted v1 controllers share one
                d.mkdir()
                made.append(d)
            if self.version == "v2":
                d = self.dirs["unified"]
                (d / "memory.max").write_text(str(memory_bytes))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(str(max_processes))
            else:
                mem = self.dirs["memory"]
                (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
                if (mem / "memory.memsw.limit_in_bytes").exists():  # swap counted too (must be >= the above)
                    (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                (self.dirs["pids"] / "pids.max").write_text(str(max_processes))
            self.cpu_seconds()
            self.oom_kills()
        except OSError:
            for d in reversed(made):
                try:
                    d.rmdir()
                except OSError:
                    pass
            raise

    @property
    def join_dirs(self) -> list[str]:
        """The directories whose ``cgroup.procs`` a command's first process writes its pid to."""
        return [str(d) for d in dict.fromkeys(self.dirs.values())]

    def cpu_seconds(self) -> float:
        """CPU time used by every process that was ever in the cgroup."""
        if self.version == "v2":
            for line in (self.dirs["unified"] / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            return 0.0
        return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9

    def oom_kills(self) -> int:
        """Processes the kernel killed for the memory limit, so far."""
        key, path = (("oom_kill", self.dirs["unified"] / "memory.events") if self.version == "v2"
                     else ("oom_kill", self.dirs["memory"] / "memory.oom_control"))
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
        return 0

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.join_dirs:
            try:
                out |= {int(p) for p in Path(d, "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return out

    def kill_all(self, wait_s: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup until none is left (True) or ``wait_s`` passed."""
        deadline = time.monotonic() + wait_s
        while True:
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left in the cgroup and remove it; OSError if it cannot be removed."""
        self.kill_all()
        for d in reversed(list(dict.fromkeys(self.dirs.values()))):
            for _ in range(100):  # a killed process leaves the cgroup a moment after it dies
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self.kill_all(0.1)
                    time.sleep(0.01)
            else:
                d.rmdir()
