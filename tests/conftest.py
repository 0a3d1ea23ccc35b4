"""Shared fixtures: a real Mosquitto broker and a real coordinator process for integration tests."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.security.certs import ServerTls
from tests.support.processes import Coordinator, Mosquitto, make_pki


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast and does not collapse when the cores are shared."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerTls:
    """One private test CA; its server certificate (localhost, 127.0.0.1) serves Mosquitto and the coordinator."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mosquitto(pki: ServerTls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), pki)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def coordinator(mosquitto: Mosquitto, pki: ServerTls, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Coordinator]:
    workdir: Path = tmp_path_factory.mktemp("coordinator")
    server = Coordinator(workdir, mosquitto.url, pki, mosquitto.admin)
    yield server
    server.stop()
