"""The port mapper's failures: each a sentence for a person, the class says which kind."""

from __future__ import annotations


class PortMapError(Exception):
    """A router did not make (or keep) a mapping."""


class NoAnswer(PortMapError):
    """Nobody answered (no such service on the gateway, or packets lost)."""


class Refused(PortMapError):
    """The router answered with an error code (``code``: the protocol's own number)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class Nonsense(PortMapError):
    """The router's answer broke the protocol (wrong size, version, opcode, nonce or port)."""
