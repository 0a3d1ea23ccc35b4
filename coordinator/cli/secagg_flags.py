"""``fedsight job create`` flags for secure aggregation -> the job body's ``secure_aggregation`` object.

With ``--epsilon`` as well the job is distributed DP (noise added on the devices, docs/privacy.md); the
coordinator validates every combination (top-k, robust strategies, clip or noise set next to ``privacy``)
and its 400 reaches the user as one readable line.
"""
from __future__ import annotations

import argparse
from typing import Any

from coordinator.cli.rest_client import CliError

# flag dest -> secure_aggregation field (coordinator/secagg/config.py)
FIELDS = {"secagg_neighbours": "neighbours", "secagg_phase_timeout": "phase_timeout_s", "secagg_clip": "clip",
          "secagg_noise_multiplier": "noise_multiplier"}


def add_secagg_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--secure-aggregation", action="store_true",
                   help="the coordinator learns only the sum of each round's updates; needs a randk codec "
                        "(docs/secagg.md); with --epsilon the devices add the DP noise")
    c.add_argument("--secagg-neighbours", type=int, metavar="N",
                   help="each device masks with N neighbours above N+1 devices per round (server default: 16)")
    c.add_argument("--secagg-phase-timeout", type=float, metavar="SECONDS",
                   help="longest wait for each protocol phase after training (server default: 30)")
    c.add_argument("--secagg-clip", type=float, metavar="C",
                   help="L2 bound each device clips what it sends to (server default: 10; with --epsilon use "
                        "--dp-clip fixed:C)")
    c.add_argument("--secagg-noise-multiplier", type=float, metavar="Z",
                   help="distributed noise without a budget (no epsilon reported; prefer --epsilon)")


def secagg_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``secure_aggregation`` from --secure-aggregation and its options (the server validates the values)."""
    given = {field: getattr(args, dest) for dest, field in FIELDS.items() if getattr(args, dest) is not None}
    if not args.secure_aggregation:
        if given:
            flags = ", ".join(f"--{dest.replace('_', '-')}" for dest in FIELDS if getattr(args, dest) is not None)
            raise CliError(f"{flags} need --secure-aggregation", "add --secure-aggregation")
        return {}
    return {"secure_aggregation": given}
