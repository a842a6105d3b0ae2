"""An example of a user's own relayrl environment, in its own package (see README.md)."""

from .env import SqliteQueryEnv

__all__ = ["SqliteQueryEnv"]
