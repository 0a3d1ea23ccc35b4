"""Camera frame -> CHW float32 array: the first preprocessing step, shared by training and inference.

numpy only, so the torch-free inference path can use it; keeping one copy means a frame is scaled the same
way when a device trains on it and when it later classifies it.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def frame_to_chw(image: Any, input_scale: float) -> np.ndarray:
    """HxW or HxWxC array -> CxHxW float32; integer pixels are divided by ``input_scale`` (e.g. 255)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"frames must be HxW or HxWxC, got shape {arr.shape}")
    scale = input_scale if np.issubdtype(arr.dtype, np.integer) else 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(scale)
