"""Coordinator state in one SQLite file (WAL): jobs, rounds, clients, updates, metrics, model versions.

One connection shared by every thread behind a re-entrant lock: the coordinator's write rate is a few rows
per received update, far below what a single SQLite connection sustains, and a single writer sidesteps
``database is locked`` errors entirely. WAL keeps readers (REST) from blocking the engine's commits.
Client tokens are stored only as their sha256 and device MAC keys not at all (coordinator/auth derives them),
so a leaked database does not leak device credentials.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
    current_round INTEGER NOT NULL DEFAULT 0, current_version TEXT, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    job_id TEXT NOT NULL, version TEXT NOT NULL, round INTEGER NOT NULL, size INTEGER NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (job_id, version));
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL,
    base_version TEXT NOT NULL, new_version TEXT, codec TEXT NOT NULL, selected TEXT NOT NULL,
    participants TEXT NOT NULL DEFAULT '[]', accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0, uplink_bytes INTEGER NOT NULL DEFAULT 0,
    downlink_bytes INTEGER NOT NULL DEFAULT 0, compression_ratio REAL, started_at REAL NOT NULL,
    closed_at REAL, duration_s REAL, metrics TEXT NOT NULL DEFAULT '{}', eval TEXT, reason TEXT,
    federated_eval TEXT, rejected_bytes INTEGER NOT NULL DEFAULT 0, junk INTEGER NOT NULL DEFAULT 0,
    junk_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, round, attempt));
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, token_sha256 TEXT NOT NULL, created_at REAL NOT NULL,
    last_seen REAL, state TEXT NOT NULL DEFAULT 'unknown', revoked_at REAL);
CREATE UNIQUE INDEX IF NOT EXISTS clients_token ON clients (token_sha256);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT, round INTEGER, attempt INTEGER,
    client_id TEXT NOT NULL, status TEXT NOT NULL, reason TEXT, bytes INTEGER NOT NULL,
    num_samples INTEGER, base_version TEXT, metrics TEXT NOT NULL DEFAULT '{}', received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS updates_job ON updates (job_id, round);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, round INTEGER NOT NULL,
    source TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS metrics_job ON metrics (job_id, round);
"""

# table -> [(column, declaration)] for databases created by an earlier version
_ADDED_COLUMNS = {"rounds": [("federated_eval", "TEXT"), ("rejected_bytes", "INTEGER NOT NULL DEFAULT 0"),
                             ("junk", "INTEGER NOT NULL DEFAULT 0"), ("junk_bytes", "INTEGER NOT NULL DEFAULT 0"),
                             ("privacy", "TEXT")],  # DP release record of a closed round (coordinator/privacy)
                  "jobs": [("reason", "TEXT")],  # why a job finished early (e.g. privacy budget reached)
                  "clients": [("revoked_at", "REAL")]}  # device revocation

_CLIENT_COLUMNS = "id, name, created_at, last_seen, state"
_JSON_COLUMNS = {"config", "codec", "selected", "participants", "metrics", "eval", "federated_eval", "privacy"}
_JOB_FIELDS = {"name", "status", "current_round", "current_version", "error", "reason"}
_ROUND_FIELDS = {"status", "new_version", "participants", "accepted", "rejected", "uplink_bytes", "rejected_bytes",
                 "junk", "junk_bytes", "compression_ratio", "closed_at", "duration_s", "metrics", "eval", "reason",
                 "selected", "federated_eval", "privacy"}


def _row(cur: sqlite3.Cursor, raw: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (name, *_), value in zip(cur.description, raw):
        out[name] = json.loads(value) if name in _JSON_COLUMNS and value is not None else value
    return out


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class Store:
    """Thread-safe access to the coordinator database; every method is one short transaction."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.row_factory = _row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # ----------------------------------------------------------------------------------------- plumbing

    def _add_missing_columns(self) -> None:
        """Columns added after a table was first created (CREATE TABLE IF NOT EXISTS leaves old files as is)."""
        for table, columns in _ADDED_COLUMNS.items():
            have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})").fetchall()}
            for name, decl in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _one(self, sql: str, args: Iterable[Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       (key, value))

    # --------------------------------------------------------------------------------------------- jobs

    def create_job(self, job_id: str, name: str, config: dict[str, Any], version: str, size: int) -> dict:
        """Insert a job together with its initial model version (round 0) in one transaction."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO jobs (id, name, config, status, current_round, current_version, created_at,"
                       " updated_at) VALUES (?, ?, ?, 'created', 0, ?, ?, ?)",
                       (job_id, name, _dump(config), version, now, now))
            db.execute("INSERT INTO models VALUES (?, ?, 0, ?, ?)", (job_id, version, size, now))
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def list_jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is None:
            return self._all("SELECT * FROM jobs ORDER BY created_at, id")
        return self._all("SELECT * FROM jobs WHERE status = ? ORDER BY created_at, id", (status,))

    def update_job(self, job_id: str, **fields: Any) -> None:
        bad = set(fields) - _JOB_FIELDS
        if bad:
            raise KeyError(f"not job fields: {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {sets}, updated_at = ? WHERE id = ?",
                       (*fields.values(), time.time(), job_id))

    # ------------------------------------------------------------------------------------------- models

    def add_model_version(self, job_id: str, version: str, round_: int, size: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?)",
                       (job_id, version, round_, size, time.time()))

    def list_model_versions(self, job_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT version, round, size, created_at FROM models WHERE job_id = ?"
                         " ORDER BY round, created_at", (job_id,))

    def get_model_version(self, job_id: str, version: str) -> dict[str, Any] | None:
        return self._one("SELECT version, round, size, created_at FROM models WHERE job_id = ? AND version = ?",
                         (job_id, version))

    # ------------------------------------------------------------------------------------------ clients

    def create_client(self, client_id: str, name: str, token_sha256: str) -> dict[str, Any]:
        """Raises ``sqlite3.IntegrityError`` if the id is taken."""
        with self._tx() as db:
            db.execute("INSERT INTO clients (id, name, token_sha256, created_at) VALUES (?, ?, ?, ?)",
                       (client_id, name, token_sha256, time.time()))
        client = self.get_client(client_id, with_secret=False)
        assert client is not None
        return client

    def get_client(self, client_id: str, with_secret: bool = False) -> dict[str, Any] | None:
        """A registered, unrevoked client (revoked ones are gone for every purpose but their records)."""
        cols = "*" if with_secret else _CLIENT_COLUMNS
        return self._one(f"SELECT {cols} FROM clients WHERE id = ? AND revoked_at IS NULL", (client_id,))

    def client_by_token_hash(self, token_sha256: str) -> dict[str, Any] | None:
        return self._one(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE token_sha256 = ? AND revoked_at IS NULL",
                         (token_sha256,))

    def client_ids(self) -> set[str]:
        with self._lock:
            return {r["id"] for r in self._db.execute("SELECT id FROM clients WHERE revoked_at IS NULL").fetchall()}

    def list_clients(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        return self._all(f"SELECT {_CLIENT_COLUMNS}, revoked_at FROM clients {where} ORDER BY created_at, id")

    def revoke_client(self, client_id: str) -> bool:
        """Mark a client revoked (its id is never reused, its records stay); False if unknown or already revoked."""
        with self._tx() as db:
            cur = db.execute("UPDATE clients SET revoked_at = ?, state = 'revoked' WHERE id = ? AND revoked_at IS NULL",
                             (time.time(), client_id))
            return cur.rowcount == 1

    def client_in_job(self, client_id: str, job_id: str) -> bool:
        """Whether any round of the job selected this client (what entitles it to the job's models)."""
        row = self._one("SELECT 1 AS x FROM rounds, json_each(rounds.selected) WHERE rounds.job_id = ? "
                        "AND json_each.value = ? LIMIT 1", (job_id, client_id))
        return row is not None

    def set_client_state(self, client_id: str, state: str, ts: float | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE clients SET state = ?, last_seen = ? WHERE id = ?",
                       (state, ts if ts is not None else time.time(), client_id))

    # ------------------------------------------------------------------------------------------- rounds

    def open_round(self, job_id: str, round_: int, attempt: int, base_version: str, codec: dict,
                   selected: list[str]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO rounds (job_id, round, attempt, status, base_version, codec, selected,"
                       " started_at) VALUES (?, ?, ?, 'open', ?, ?, ?, ?)",
                       (job_id, round_, attempt, base_version, _dump(codec), _dump(selected), time.time()))

    def update_round(self, job_id: str, round_: int, attempt: int, **fields: Any) -> None:
        bad = set(fields) - _ROUND_FIELDS
        if bad:
            raise KeyError(f"not round fields: {sorted(bad)}")
        values = [_dump(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE rounds SET {sets} WHERE job_id = ? AND round = ? AND attempt = ?",
                       (*values, job_id, round_, attempt))

    def commit_round(self, job_id: str, round_: int, attempt: int, version: str, size: int,
                     fields: dict[str, Any], metrics: Iterable[tuple[dict[str, float], str]] = ()) -> None:
        """Close a round and advance its job in ONE transaction: after a crash the store shows either the
        round still open (and re-aggregated on restart) or the round closed and the job moved on, never half."""
        fields = {**fields, "new_version": version}
        bad = set(fields) - _ROUND_FIELDS
        if bad:
            raise KeyError(f"not round fields: {sorted(bad)}")
        values = [_dump(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?)", (job_id, version, round_, size, now))
            db.execute(f"UPDATE rounds SET {sets} WHERE job_id = ? AND round = ? AND attempt = ?",
                       (*values, job_id, round_, attempt))
            db.execute("UPDATE jobs SET current_round = ?, current_version = ?, updated_at = ? WHERE id = ?",
                       (round_, version, now, job_id))
            for vals, source in metrics:
                db.executemany("INSERT INTO metrics (job_id, round, source, name, value, ts) VALUES (?,?,?,?,?,?)",
                               [(job_id, round_, source, k, float(v), now) for k, v in vals.items()])

    def get_rounds(self, job_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM rounds WHERE job_id = ? ORDER BY round, attempt", (job_id,))

    def get_round(self, job_id: str, round_: int, attempt: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM rounds WHERE job_id = ? AND round = ? AND attempt = ?",
                         (job_id, round_, attempt))

    def next_attempt(self, job_id: str, round_: int) -> int:
        row = self._one("SELECT MAX(attempt) AS a FROM rounds WHERE job_id = ? AND round = ?", (job_id, round_))
        return int(row["a"] or 0) + 1 if row else 1

    def job_traffic(self, job_id: str) -> dict[str, int]:
        """Totals over the job's round records: accepted uplink, rejected and junk bytes, junk messages."""
        row = self._one("SELECT COALESCE(SUM(uplink_bytes), 0) AS uplink_bytes, COALESCE(SUM(rejected_bytes), 0)"
                        " AS rejected_bytes, COALESCE(SUM(rejected), 0) AS rejected, COALESCE(SUM(junk), 0) AS junk,"
                        " COALESCE(SUM(junk_bytes), 0) AS junk_bytes FROM rounds WHERE job_id = ?", (job_id,))
        return {k: int(v) for k, v in (row or {}).items()}

    def abort_open_rounds(self, job_id: str | None = None, reason: str = "coordinator stopped") -> int:
        """Mark rounds left 'open' (by a stop or a crash) as aborted; returns how many."""
        where, args = ("AND job_id = ?", (job_id,)) if job_id else ("", ())
        with self._tx() as db:
            cur = db.execute(f"UPDATE rounds SET status = 'aborted', reason = ?, closed_at = ? "
                             f"WHERE status = 'open' {where}", (reason, time.time(), *args))
            return cur.rowcount

    def add_downlink(self, job_id: str, version: str, nbytes: int) -> None:
        """Charge served model bytes to the latest round that used ``version`` as its base."""
        if nbytes <= 0:
            return
        with self._tx() as db:
            db.execute("UPDATE rounds SET downlink_bytes = downlink_bytes + ? WHERE rowid = (SELECT rowid FROM"
                       " rounds WHERE job_id = ? AND base_version = ? ORDER BY round DESC, attempt DESC LIMIT 1)",
                       (nbytes, job_id, version))

    # ------------------------------------------------------------------------------------------ updates

    def add_update(self, *, client_id: str, status: str, bytes_: int, job_id: str | None = None,
                   round_: int | None = None, attempt: int | None = None, reason: str | None = None,
                   num_samples: int | None = None, base_version: str | None = None,
                   metrics: dict[str, float] | None = None) -> int:
        with self._tx() as db:
            cur = db.execute("INSERT INTO updates (job_id, round, attempt, client_id, status, reason, bytes,"
                             " num_samples, base_version, metrics, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (job_id, round_, attempt, client_id, status, reason, bytes_, num_samples,
                              base_version, _dump(metrics or {}), time.time()))
            return int(cur.lastrowid or 0)

    def list_updates(self, job_id: str, round_: int | None = None, status: str | None = None,
                     limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM updates WHERE job_id = ?", [job_id]
        if round_ is not None:
            sql, args = sql + " AND round = ?", [*args, round_]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        return self._all(sql + " ORDER BY id LIMIT ? OFFSET ?", [*args, limit, offset])

    def list_client_updates(self, client_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM updates WHERE client_id = ? ORDER BY id DESC LIMIT ?", (client_id, limit))

    # ------------------------------------------------------------------------------------------ metrics

    def add_metrics(self, job_id: str, round_: int, values: dict[str, float], source: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT INTO metrics (job_id, round, source, name, value, ts) VALUES (?,?,?,?,?,?)",
                           [(job_id, round_, source, k, float(v), now) for k, v in values.items()])

    def list_metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT round, source, name, value, ts FROM metrics WHERE job_id = ? ORDER BY round, id",
                         (job_id,))
