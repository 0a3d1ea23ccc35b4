"""Model builders for edge fine-tuning (torch).

``build_model`` mirrors the torchvision builder style but never downloads anything: models are always
randomly initialised (``weights=None`` to torchvision) and a user's own ``state_dict`` file can be loaded on
top. Every model built here records the name of its classification head so that a trainer can freeze the
backbone (:func:`backbone_and_head`).

Loading user weights (``weights=``):

* The file is read with ``torch.load(weights_only=True)``; a bare ``state_dict`` or a dict holding it under
  ``"state_dict"``/``"model"`` is accepted, and a DataParallel ``"module."`` prefix is stripped.
* Head tensors whose shape differs (the checkpoint was trained for another ``num_classes``) are skipped and
  keep their fresh random init — the normal transfer-learning case; a warning names them. Pass
  ``strict_head=True`` to get an error instead.
* A first-conv weight saved for 3 input channels is adapted to ``in_channels``: summed over RGB for 1 channel
  (a grey image replicated to RGB gives the same activations), channel-mean repeated otherwise.
* Any other missing/unexpected key or shape mismatch raises :class:`WeightsMismatchError` saying what to do;
  when the keys fit another architecture built here, the message names it.
* ``weights`` may also be the file's bytes (a coordinator receives the file over REST, never a path).
"""
from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

log = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = (
    "small_cnn",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
)

# attribute holding the head's child name on models built here
_HEAD_ATTR = "fedsight_head"
_HEAD_FALLBACKS = ("classifier", "fc", "head", "heads")


class WeightsMismatchError(ValueError):
    """A weights file does not fit the requested architecture."""


class SmallCNN(nn.Module):
    """Tiny 3-conv CNN (~26k params for 10 classes) for 8x8 digits and larger inputs alike.

    Adaptive average pooling to 2x2 keeps a little spatial layout while making any input size >= 2 work.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, 16),
            *block(16, 32),
            nn.MaxPool2d(2, ceil_mode=True),
            *block(32, 64),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(64 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _tv(name: str, head: str) -> Callable[[int], nn.Module]:
    def make(num_classes: int) -> nn.Module:
        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        setattr(model, _HEAD_ATTR, head)
        return model

    return make


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "mobilenet_v3_small": _tv("mobilenet_v3_small", "classifier"),
    "mobilenet_v3_large": _tv("mobilenet_v3_large", "classifier"),
    "resnet18": _tv("resnet18", "fc"),
    "efficientnet_b0": _tv("efficientnet_b0", "classifier"),
    "shufflenet_v2_x1_0": _tv("shufflenet_v2_x1_0", "fc"),
}


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return name, mod
    raise ValueError("model has no Conv2d layer")


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    name, conv = _first_conv(model)
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    )
    _set_submodule(model, name, new)


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    weights: Weights | None = None,
    *,
    strict_head: bool = False,
) -> nn.Module:
    """Build ``arch`` with a ``num_classes`` head and an ``in_channels`` first conv, randomly initialised.

    ``weights``: path to a user's ``state_dict`` file (or the mapping itself), loaded as described in the
    module docstring. Nothing is ever downloaded.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid names: {', '.join(ARCHS)}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1 (got {num_classes}, {in_channels})")
    if arch == "small_cnn":
        model: nn.Module = SmallCNN(num_classes, in_channels)
        setattr(model, _HEAD_ATTR, "classifier")
    else:
        model = _BUILDERS[arch](num_classes)
        _adapt_first_conv(model, in_channels)
    if weights is not None:
        load_weights(model, weights, strict_head=strict_head, arch=arch)
    return model


def head_name(model: nn.Module) -> str:
    """Name of the top-level child that is the classification head."""
    name = getattr(model, _HEAD_ATTR, None)
    if isinstance(name, str) and hasattr(model, name):
        return name
    for cand in _HEAD_FALLBACKS:
        if isinstance(getattr(model, cand, None), nn.Module):
            return cand
    raise ValueError(
        f"cannot find the head of {type(model).__name__}: build it with build_model() or give it a "
        f"child named one of {_HEAD_FALLBACKS}"
    )


def head_module(model: nn.Module) -> nn.Module:
    return model.get_submodule(head_name(model))


def backbone_and_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (backbone, head) so a trainer can freeze the backbone."""
    prefix = head_name(model) + "."
    backbone: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (head if name.startswith(prefix) else backbone).append(p)
    return backbone, head


Weights = str | Path | bytes | Mapping[str, torch.Tensor]


def _read_state(weights: Weights) -> dict[str, torch.Tensor]:
    if isinstance(weights, Mapping):
        state = dict(weights)
    elif isinstance(weights, (bytes, bytearray)):
        try:
            state = torch.load(io.BytesIO(bytes(weights)), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
            raise WeightsMismatchError(
                f"weights file is not a state_dict torch can load safely ({type(exc).__name__}); save it with "
                "torch.save(model.state_dict(), path)") from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(
            "weights file must hold a state_dict (mapping of name -> tensor); save it with "
            "torch.save(model.state_dict(), path)"
        )
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def load_weights(
    model: nn.Module,
    weights: Weights,
    *,
    strict_head: bool = False,
    arch: str | None = None,
) -> None:
    """Load a user's ``state_dict`` into ``model`` in place (see module docstring for the rules)."""
    state = _read_state(weights)
    own = model.state_dict()
    what = f"arch {arch!r}" if arch else type(model).__name__
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        guess = guess_arch(state)
        origin = (f"The file holds a {guess!r} state_dict (another architecture): use arch {guess!r}, or "
                  f"weights saved from {what}."
                  if guess and guess != arch else
                  f"Was the checkpoint saved from another architecture? Pass the arch it was trained with "
                  f"(one of {', '.join(ARCHS)}).")
        raise WeightsMismatchError(
            f"weights do not match {what}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. {origin}"
        )
    head_prefix = head_name(model) + "."
    conv_key = _first_conv(model)[0] + ".weight"
    merged: dict[str, torch.Tensor] = {}
    reinit: list[str] = []
    for key, mine in own.items():
        theirs = state[key]
        if theirs.shape == mine.shape:
            merged[key] = theirs
        elif key == conv_key and theirs.dim() == 4 and theirs.shape[0] == mine.shape[0] \
                and theirs.shape[2:] == mine.shape[2:]:
            merged[key] = _adapt_conv_weight(theirs, mine.shape[1])
            log.info("adapted %s from %d to %d input channels", key, theirs.shape[1], mine.shape[1])
        elif key.startswith(head_prefix):
            if strict_head:
                raise WeightsMismatchError(
                    f"head tensor {key} has shape {tuple(theirs.shape)} in the weights file but "
                    f"{tuple(mine.shape)} in the model: build with the checkpoint's num_classes, or pass "
                    f"strict_head=False to re-initialise the head"
                )
            merged[key] = mine
            reinit.append(key)
        else:
            raise WeightsMismatchError(
                f"tensor {key} has shape {tuple(theirs.shape)} in the weights file but {tuple(mine.shape)} "
                f"in {what}: the checkpoint does not fit this architecture/in_channels"
            )
    if reinit:
        log.warning("weights: head tensors %s did not match num_classes; they keep a random init", reinit)
    model.load_state_dict(merged, strict=True)


def guess_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The architecture built here whose state_dict has exactly these keys, if any (built on the meta device)."""
    keys = set(state)
    for arch in ARCHS:
        with torch.device("meta"):
            model = SmallCNN(10, 3) if arch == "small_cnn" else _BUILDERS[arch](10)
        if set(model.state_dict()) == keys:
            return arch
    return None


def _adapt_conv_weight(w: torch.Tensor, in_channels: int) -> torch.Tensor:
    if in_channels == 1:
        return w.sum(dim=1, keepdim=True)
    mean = w.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (w.shape[1] / in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
