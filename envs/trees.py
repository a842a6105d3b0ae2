"""Directory trees of any depth, walked and removed without recursion.

A command in a sandbox can make a tree as deep as it likes: ``mkdir d; cd d`` in a loop passes
Python's recursion limit (``os.walk`` and ``shutil.rmtree`` recurse, one frame per level) and
PATH_MAX (4,096 bytes: a full path to the bottom cannot be opened). The workspace snapshot and
the removal of a closed sandbox must still work, or a 1,500-level tree made by one command
turns scoring into an error and leaves the workspace on disk. Here the walk works by directory
descriptors (``openat``, never a full path, never following a symlink) with an explicit stack,
and removal goes through GNU ``rm`` (which walks the same way), with Python's as a fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .sandbox import SandboxError

MAX_OPEN_DIRS = 64
"""Directory descriptors a walk keeps open at most, however deep the tree."""


class _Dir:
    __slots__ = ("name", "fd", "subdirs")

    def __init__(self, name: str, fd: int | None) -> None:
        self.name = name
        self.fd = fd
        self.subdirs: list[str] = []


class _Walk:
    """Depth-first over a directory tree with an explicit stack (no recursion), by descriptors
    (never following a symlink), holding at most ``MAX_OPEN_DIRS`` of them: a directory whose
    descriptor was closed to stay under that is reopened from its nearest open ancestor when
    its next subdirectory is due."""

    def __init__(self, root: Path) -> None:
        self.stack = [_Dir("", os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))]
        self.open = 1

    def files(self) -> Iterator[tuple[str, int, str]]:
        try:
            yield from self._list()
            while self.stack:
                frame = self.stack[-1]
                if not frame.subdirs:
                    self._close(frame)
                    self.stack.pop()
                    continue
                name = frame.subdirs.pop()
                parent = self._fd(len(self.stack) - 1)
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
                except OSError:
                    continue  # gone, or replaced by a link since it was listed
                self.open += 1
                if not frame.subdirs and len(self.stack) > 1:  # its last one: not needed again
                    self._close(frame)
                self.stack.append(_Dir(name, fd))
                self._cap()
                yield from self._list()
        finally:
            for frame in self.stack:
                self._close(frame)

    def _list(self) -> Iterator[tuple[str, int, str]]:
        frame = self.stack[-1]
        assert frame.fd is not None
        with os.scandir(frame.fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        files = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    frame.subdirs.append(e.name)
                elif e.is_file(follow_symlinks=False):
                    files.append(e.name)
            except OSError:
                pass
        frame.subdirs.reverse()  # popped from the end: in name order
        if files:
            prefix = "/".join(f.name for f in self.stack[1:])
            for name in files:
                yield (f"{prefix}/{name}" if prefix else name), frame.fd, name

    def _fd(self, i: int) -> int:
        """The descriptor of ``stack[i]``, reopened from its nearest open ancestor if closed."""
        fd = self.stack[i].fd
        if fd is not None:
            return fd
        j = i - 1
        while self.stack[j].fd is None:  # the root's is never closed
            j -= 1
        fd = self.stack[j].fd
        for k in range(j + 1, i + 1):
            nxt = os.open(self.stack[k].name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            if k > j + 1:
                os.close(fd)
            fd = nxt
        self.stack[i].fd = fd
        self.open += 1
        self._cap()
        return fd

    def _cap(self) -> None:
        if self.open <= MAX_OPEN_DIRS:
            return
        for frame in self.stack[1:-1]:  # the shallowest first; the root and the current stay
            if frame.fd is not None:
                self._close(frame)
                if self.open <= MAX_OPEN_DIRS:
                    return

    def _close(self, frame: _Dir) -> None:
        if frame.fd is not None:
            os.close(frame.fd)
            frame.fd = None
            self.open -= 1


def regular_files(root: Path) -> Iterator[tuple[str, int, str]]:
    """(path relative to ``root``, descriptor of its directory, name) of every regular file
    under ``root``, in name order, at any depth; symlinks are neither followed nor listed."""
    return _Walk(root).files()


def remove_tree(path: Path) -> None:
    """Delete a workspace however deep it is and whatever modes its command left on it;
    SandboxError if it is still there after every way was tried."""
    if not os.path.lexists(path):
        return
    rm, chmod = shutil.which("rm"), shutil.which("chmod")
    if rm:  # GNU rm walks by descriptors: any depth, and no recursion in this process
        for fix in ([], [chmod, "-R", "u+rwX", "--", str(path)] if chmod else []):
            if fix:  # a command may leave directories without write or search permission
                subprocess.run(fix, capture_output=True, timeout=300)
            subprocess.run([rm, "-rf", "--one-file-system", "--", str(path)], capture_output=True, timeout=300)
            if not os.path.lexists(path):
                return

    def fix_mode(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    try:
        shutil.rmtree(path, onerror=fix_mode)
    except RecursionError:
        pass
    if os.path.lexists(path):
        raise SandboxError(f"could not delete the sandbox workspace {path}")
