"""The one exception type every decoder in the protocol raises.

Anything received from the network is hostile until proven otherwise; decoders turn every failure into a
``ProtocolError`` whose ``reason`` is short, specific and safe to send back to the sender.
"""
from __future__ import annotations


class ProtocolError(ValueError):
    """A payload or spec that cannot be accepted; ``reason`` says why in words a sender can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
