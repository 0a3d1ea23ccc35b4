"""Fine-tuning from a user's weights: upload over REST, head replacement, mismatch errors, freeze, backbone lr."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from torch.utils.data import TensorDataset

from coordinator.api.app import create_app
from coordinator.cli import main as cli
from edge_sdk.models import backbone_and_head, build_model
from edge_sdk.protocol.modelfile import load_model
from edge_sdk.trainer import LocalTrainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JOB = {"name": "ft", "model": {"arch": "mobilenet_v3_small", "num_classes": 4, "in_channels": 3, "image_size": 32},
       "rounds": 2, "clients_per_round": 2, "min_clients": 1}


def _state_bytes(arch: str, num_classes: int, seed: int = 1) -> tuple[bytes, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    state = build_model(arch, num_classes, 3).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue(), state


@pytest.fixture
def http(tmp_path):
    app = create_app({"data_dir": tmp_path, "evaluate": False, "broker_url": "mqtt://127.0.0.1:1999"})
    client = app.test_client()
    token = app.extensions["fedsight"].credentials.path("operator-token").read_text().strip()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"  # job creation is an operator endpoint
    yield client
    app.extensions["fedsight"].close()


def _post(http, body: dict, weights: bytes | None, name: str = "imagenet.pt"):
    import json

    data = {"job": json.dumps(body)}
    if weights is not None:
        data["weights"] = (io.BytesIO(weights), name)
    return http.post("/api/v1/jobs", data=data, content_type="multipart/form-data")


def test_uploaded_torchvision_weights_become_version_zero_with_a_new_head(http) -> None:
    raw, state = _state_bytes("mobilenet_v3_small", 1000)  # a torchvision ImageNet-shaped state_dict
    resp = _post(http, JOB, raw)
    assert resp.status_code == 201, resp.json
    job = resp.json
    record = job["config"]["model"]["weights"]
    assert record["bytes"] == len(raw) and record["filename"] == "imagenet.pt" and len(record["sha256"]) == 64
    app = http.application
    arrays, _meta = load_model(app.extensions["fedsight"].models.get(job["current_version"]))
    for key in ("features.0.0.weight", "features.3.block.0.1.running_var", "classifier.0.weight"):
        assert np.array_equal(arrays[key], state[key].numpy()), key
    assert arrays["classifier.3.weight"].shape == (4, 1024)  # head replaced for the job's classes


def test_weights_of_another_architecture_are_refused_and_create_nothing(http) -> None:
    raw, _ = _state_bytes("resnet18", 1000)
    resp = _post(http, JOB, raw)
    assert resp.status_code == 400
    msg = resp.json["error"]
    assert "mobilenet_v3_small" in msg and "'resnet18'" in msg and "missing keys" in msg
    assert http.get("/api/v1/jobs").json["jobs"] == []
    assert list(http.application.extensions["fedsight"].models.root.glob("**/*.fsm")) == []


@pytest.mark.parametrize("weights,needle", [
    (b"not a torch file", "not a state_dict"),
    (b"", "empty"),
])
def test_unreadable_weights_files_are_refused(http, weights: bytes, needle: str) -> None:
    resp = _post(http, JOB, weights)
    assert resp.status_code == 400 and needle in resp.json["error"]
    assert http.get("/api/v1/jobs").json["jobs"] == []


def test_weights_as_a_server_path_are_refused(http) -> None:
    body = {**JOB, "model": {**JOB["model"], "weights": "/etc/passwd"}}
    resp = http.post("/api/v1/jobs", json=body)
    assert resp.status_code == 400 and "send the weights file itself" in resp.json["error"]


def test_unknown_multipart_fields_are_refused(http) -> None:
    resp = http.post("/api/v1/jobs", data={"job": "{}", "extra": "x"}, content_type="multipart/form-data")
    assert resp.status_code == 400 and "'extra'" in resp.json["error"]


def test_cli_sends_the_weights_file_to_a_remote_coordinator(coordinator, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSIGHT_TOKEN", coordinator.token)  # job creation is an operator endpoint
    good, mismatched = tmp_path / "mb.pt", tmp_path / "rn.pt"
    good.write_bytes(_state_bytes("mobilenet_v3_small", 1000)[0])
    mismatched.write_bytes(_state_bytes("resnet18", 1000)[0])
    common = ["job", "create", "--coordinator", coordinator.url, "--ca", str(coordinator.ca), "--arch", "mobilenet_v3_small", "--num-classes",
              "4", "--in-channels", "3", "--image-size", "32", "--eval", "none"]
    before = coordinator.http.get(f"{coordinator.api}/jobs", timeout=10).json()["jobs"]
    assert cli.main([*common, "--weights", str(mismatched)]) == 2
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "'resnet18'" in err
    assert coordinator.http.get(f"{coordinator.api}/jobs", timeout=10).json()["jobs"] == before
    assert cli.main([*common, "--weights", str(good), "--backbone-lr-mult", "0.1"]) == 0
    job_id = capsys.readouterr().out.strip()
    cfg = coordinator.http.get(f"{coordinator.api}/jobs/{job_id}", timeout=10).json()["config"]
    assert cfg["model"]["weights"]["filename"] == "mb.pt" and cfg["train"]["backbone_lr_mult"] == 0.1
    assert cli.main([*common, "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "weights file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ freeze and backbone lr
def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g) + y[:, None, None, None].float(), y)


def _moved(mult: float, freeze: bool = False) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3)
    backbone, head = backbone_and_head(model)
    b0, h0 = [p.detach().clone() for p in backbone], [p.detach().clone() for p in head]
    LocalTrainer("cpu").train(model, _data(), {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.0,
                                               "backbone_lr_mult": mult, "freeze_backbone": freeze})

    def dist(ps: list[torch.Tensor], qs: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(ps, qs)))
    return dist(backbone, b0), dist(head, h0)


def test_backbone_lr_multiplier_scales_backbone_steps_only() -> None:
    full_b, full_h = _moved(1.0)
    slow_b, slow_h = _moved(0.1)
    assert full_b > 0 and full_h > 0 and slow_h > 0
    assert 0 < slow_b < 0.3 * full_b  # ~0.1x the step on the first batch, diverging paths after
    assert _moved(0.0)[0] == 0.0 and _moved(1.0, freeze=True)[0] == 0.0  # 0 freezes, as --freeze-backbone


def test_optimizer_groups_carry_the_backbone_lr() -> None:
    model = build_model("small_cnn", 4, 3)
    _trainable, groups = LocalTrainer._param_groups(model, TrainConfig(lr=0.2, backbone_lr_mult=0.25))
    backbone, head = backbone_and_head(model)
    assert [g.get("lr") for g in groups] == [0.05, None]  # None: the optimiser default lr (0.2)
    assert [len(g["params"]) for g in groups] == [len(backbone), len(head)]
    with pytest.raises(ValueError, match="invalid train config"):
        TrainConfig.coerce({"backbone_lr_mult": -1.0})
