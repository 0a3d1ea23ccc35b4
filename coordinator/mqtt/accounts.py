"""Broker accounts for devices: the interface registration and revocation use.

Registration gives each device its own MQTT username (its MQTT client id) and password through
:class:`BrokerAccounts`; revocation removes the account. Brokers that enforce accounts implement it; a
coordinator without one (``Services.accounts is None``) returns no MQTT credentials.
"""
from __future__ import annotations

from typing import Protocol


class BrokerAccounts(Protocol):
    def add_device(self, client_id: str, password: str) -> None: ...

    def remove_device(self, client_id: str) -> None: ...


class NoAccounts:
    """Accepts every call and enforces nothing (a broker that allows anonymous clients)."""

    def add_device(self, client_id: str, password: str) -> None:
        return None

    def remove_device(self, client_id: str) -> None:
        return None
