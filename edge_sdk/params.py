"""Moving model state between torch modules and the numpy arrays the protocol speaks."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .protocol.modelfile import Arrays


def state_to_arrays(model: nn.Module) -> Arrays:
    """A copy of ``model.state_dict()`` as numpy arrays (CPU), in state_dict order."""
    return {k: v.detach().to("cpu").numpy().copy() for k, v in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: Arrays) -> None:
    """Load arrays into ``model`` in place (strict: names and shapes must match)."""
    current = model.state_dict()
    missing = set(current) - set(arrays)
    extra = set(arrays) - set(current)
    if missing or extra:
        raise ValueError(f"model state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    state = {}
    for k, ref in current.items():
        a = np.asarray(arrays[k])
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch for {k}: file {a.shape}, model {tuple(ref.shape)}")
        state[k] = torch.from_numpy(np.ascontiguousarray(a)).to(ref.dtype)
    model.load_state_dict(state)
