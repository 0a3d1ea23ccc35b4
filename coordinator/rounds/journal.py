"""Durable round state under ``<data_dir>/journal``: accepted updates of open rounds, and strategy state.

An update is acked as accepted only after its exact bytes are written here, so a coordinator killed at any
moment between accepting updates and committing the round can rebuild the round's aggregate on restart by
re-folding the spooled updates (``coordinator/rounds/recovery.py``): nothing acked is lost, and because a
round's spool is keyed by client id, nothing is counted twice. Updates are re-folded in the order they were
accepted (the spool's ``order`` file): with an adaptive clip bound that moves after every update, the order
decides the aggregate. Strategy state (FedAdam/FedYogi moments, the adaptive clip bound) is saved per
committed round, so a restart continues the optimiser instead of resetting it::

    journal/spool/<job>/<round>-<attempt>/<client>.upd    raw update messages, deleted once the round commits
    journal/spool/<job>/<round>-<attempt>/order           client ids in the order their updates were accepted
    journal/strategy/<job>/<round>.npz                     strategy state after round <round> (last two kept)

Every file is written to a temporary name, fsynced and renamed, so a crash leaves whole files only.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edge_sdk.protocol import topics

log = logging.getLogger(__name__)


class RoundJournal:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------------------------ update spool

    def _spool(self, job_id: str, round_: int, attempt: int) -> Path:
        if not topics.valid_id(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.root / "spool" / job_id / f"{int(round_)}-{int(attempt)}"

    def save_update(self, job_id: str, round_: int, attempt: int, client_id: str, raw: bytes) -> None:
        """Durably store one accepted update (raises OSError, e.g. ENOSPC, if it cannot)."""
        if not topics.valid_id(client_id):
            raise ValueError(f"invalid client id {client_id!r}")
        directory = self._spool(job_id, round_, attempt)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / f"{client_id}.upd", raw)
        with (directory / "order").open("a", encoding="ascii") as fh:  # callers hold the round's lock
            fh.write(client_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def load_updates(self, job_id: str, round_: int, attempt: int) -> list[tuple[str, bytes]]:
        """(client id, raw message) of every spooled update, in the order they were accepted (an update whose
        order line was lost to a crash was the last one written: it comes last)."""
        directory = self._spool(job_id, round_, attempt)
        if not directory.is_dir():
            return []
        order_file = directory / "order"
        listed = order_file.read_text(encoding="ascii", errors="replace").split() if order_file.exists() else []
        rank = {cid: i for i, cid in reversed(list(enumerate(listed)))}  # first acceptance counts
        files = sorted(directory.glob("*.upd"), key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
        return [(p.stem, p.read_bytes()) for p in files]

    def drop_round(self, job_id: str, round_: int, attempt: int) -> None:
        shutil.rmtree(self._spool(job_id, round_, attempt), ignore_errors=True)

    def drop_spool(self, job_id: str) -> None:
        """Forget every spooled round of a job (its open rounds were aborted)."""
        if topics.valid_id(job_id):
            shutil.rmtree(self.root / "spool" / job_id, ignore_errors=True)

    # -------------------------------------------------------------------------------- strategy state

    def _strategy_dir(self, job_id: str) -> Path:
        if not topics.valid_id(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.root / "strategy" / job_id

    def save_strategy(self, job_id: str, round_: int, state: dict[str, np.ndarray]) -> None:
        """State after ``round_``; written before the round commits, so it is there whenever the commit is."""
        if not state:
            return
        directory = self._strategy_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".npz", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **state)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, directory / f"{int(round_)}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_strategy(self, job_id: str, round_: int) -> dict[str, np.ndarray] | None:
        path = self._strategy_dir(job_id) / f"{int(round_)}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def prune_strategy(self, job_id: str, keep_from: int) -> None:
        directory = self._strategy_dir(job_id)
        for path in directory.glob("*.npz") if directory.is_dir() else []:
            if path.stem.isdigit() and int(path.stem) < keep_from:
                path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
