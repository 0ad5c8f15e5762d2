"""Anteroom dispatchers for Python apps: ``anteroom-wsgi MODULE:APP``.

See README.md; the protocol is docs/protocol.md of the Anteroom repository.
"""
from .dispatcher import Dispatcher

__all__ = ["Dispatcher"]
