"""How `fedsight job status` shows a job: the rounds table and its evaluation lines (pure functions, tested alone)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def eval_summary(cfg: dict[str, Any]) -> str:
    """How the job's versions are scored, in words (the columns below depend on it)."""
    ev = cfg.get("eval") or {}
    parts = []
    if ev.get("dataset") == "imagefolder":
        parts.append(f"server-side on {ev.get('path')}")
    elif ev.get("dataset"):
        parts.append(f"server-side on {ev['dataset']}")
    if ev.get("holdout_fraction"):
        parts.append(f"devices on {ev['holdout_fraction']:.0%} held-out data")
    return " + ".join(parts) or "none"


def _score(value: dict[str, Any] | None) -> str:
    """Accuracy cell: a percentage, or the evaluation's state (failed/pending/...), '-' only when not configured."""
    if not value:
        return "-"
    if value.get("accuracy") is not None:
        return f"{value['accuracy'] * 100:.1f}%"
    if value.get("error"):
        return "failed"
    return str(value.get("status", "-"))


def eval_notes(rounds: Sequence[dict[str, Any]]) -> list[str]:
    """One line per failed evaluation, with its reason (a failure is never just a '-')."""
    notes = []
    for r in rounds:
        if (r.get("eval") or {}).get("error"):
            notes.append(f"round {r.get('round')}: server evaluation failed: {r['eval']['error']}")
        fed = r.get("federated_eval") or {}
        server_scored = (r.get("eval") or {}).get("accuracy") is not None
        if fed.get("status") == "failed" or (fed.get("status") == "not_run" and not server_scored):
            notes.append(f"round {r.get('round')}: device evaluation {fed['status'].replace('_', ' ')}: "
                         f"{fed.get('reason', '')}")
    return notes


def privacy_summary(job: dict[str, Any]) -> str | None:
    """One line for a DP job: budget, what was spent, noise and clipping (None for other jobs)."""
    p = job.get("privacy")
    if not p:
        return None
    bound = p.get("clip_bound")
    return (f"privacy: epsilon {p['epsilon_spent']:.3f} of {p['target_epsilon']:g} spent (delta {p['delta']:g}) "
            f"over {p['rounds_released']} round(s), noise multiplier {p['noise_multiplier']:.3g}, "
            f"{p['clip_mode']} clip bound {bound:.3g}"
            + ("; noise added on the devices (secure aggregation)" if p.get("noise_added_by") == "devices" else "")
            + "; no sampling amplification claimed")


def rounds_table(rounds: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per round attempt; DP jobs get an ``epsilon`` column (total spent once the round closed)."""
    from coordinator.cli.chart import human_bytes

    private = any(r.get("privacy") for r in rounds)
    rows = []
    for r in rounds:
        ratio = r.get("compression_ratio")  # 4 x numel over the mean accepted message: vs raw fp32, not measured
        refused = int(r.get("rejected_bytes") or 0) + int(r.get("junk_bytes") or 0)
        rows.append([str(r.get("round")), str(r.get("status", "")),
                     f"{r.get('accepted', 0)}/{r.get('rejected', 0)}/{r.get('junk') or 0}",
                     human_bytes(r.get("uplink_bytes") or 0), human_bytes(refused) if refused else "-",
                     human_bytes(r.get("downlink_bytes") or 0), f"{ratio:.1f}x" if ratio else "-",
                     _score(r.get("eval")), _score(r.get("federated_eval")), f"{r.get('duration_s') or 0:.1f}s"])
        if private:
            eps = (r.get("privacy") or {}).get("epsilon")
            rows[-1].append(f"{eps:.3f}" if eps is not None else "-")
    header = ["round", "status", "acc/rej/junk", "uplink", "refused", "downlink", "vs raw fp32", "accuracy",
              "device acc", "time"]
    return header + (["epsilon"] if private else []), rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
