"""Stores: the interface and its implementations."""

from facegate_server.store.base import Store
from facegate_server.store.memory import MemoryStore
from facegate_server.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore", "Store"]
