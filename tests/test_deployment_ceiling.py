"""The deployment benchmark's centralised ceiling never trains fewer samples than the fleet did."""
from __future__ import annotations

import argparse
import math

from benchmarks.deployment import ceiling_epochs


def _args(rounds: int, max_steps: int, epochs: int = 1) -> argparse.Namespace:
    return argparse.Namespace(rounds=rounds, epochs=epochs, max_steps=max_steps, devices=5, batch_size=32)


def test_whole_epochs_without_a_step_cap() -> None:
    assert ceiling_epochs(_args(20, 0), 3000) == 20
    assert ceiling_epochs(_args(10, 0, epochs=3), 3000) == 30
    assert ceiling_epochs(argparse.Namespace(rounds=20, epochs=1, devices=5, batch_size=32), 3000) == 20  # old runs


def test_a_step_cap_rounds_the_fleets_samples_up_to_whole_epochs() -> None:
    for rounds, steps in ((50, 8), (75, 5), (40, 10), (50, 7)):
        epochs = ceiling_epochs(_args(rounds, steps), 3000)
        fleet = rounds * 5 * steps * 32  # samples, if every device had max_steps batches
        assert epochs * 3000 >= fleet > (epochs - 1) * 3000
    assert ceiling_epochs(_args(50, 8), 3000) == 22
    assert ceiling_epochs(_args(20, 10_000), 3000) == 20  # a cap above a whole epoch: epochs bound it
    assert math.isclose(ceiling_epochs(_args(75, 5), 3000), 20)
