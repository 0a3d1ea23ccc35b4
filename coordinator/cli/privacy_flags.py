"""``fedsight job create`` flags for client-level differential privacy -> the job body's ``privacy`` object."""
from __future__ import annotations

import argparse
from typing import Any

from coordinator.cli.rest_client import CliError


def privacy_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``privacy`` from --epsilon/--delta/--noise-multiplier/--dp-clip (the server validates the values)."""
    dp = {k: v for k, v in (("delta", args.delta), ("noise_multiplier", args.noise_multiplier)) if v is not None}
    if args.dp_clip:
        mode, _, bound = args.dp_clip.partition(":")
        try:
            dp["clip"] = {"mode": mode, **({"bound": float(bound)} if bound else {})}
        except ValueError:
            raise CliError(f"bad --dp-clip {args.dp_clip!r}", "use fixed:C or adaptive:C, e.g. fixed:1.0") from None
    if args.epsilon is None:
        if dp:
            raise CliError("--delta, --noise-multiplier and --dp-clip need --epsilon", "add --epsilon BUDGET")
        return {}
    return {"privacy": {"epsilon": args.epsilon, **dp}}
