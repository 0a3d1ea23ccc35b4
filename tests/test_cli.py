"""The `fedsight` CLI: spec grammar, help, readable errors, REST commands, export and torch-free inference."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests

from converters import spec_text
from coordinator.cli import main as cli
from tests.support.processes import ROOT, child_env, free_port


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), cwd=ROOT)


# ------------------------------------------------------------------------------------------ spec text
@pytest.mark.parametrize("text,expected", [
    ("topk:0.01:int8", {"name": "topk", "density": 0.01, "values": "int8", "scope": "global",
                        "error_feedback": True, "stochastic": False}),
    ("topk:0.05:fp16:per_tensor:noef", {"name": "topk", "density": 0.05, "values": "float16",
                                        "scope": "per_tensor", "error_feedback": False, "stochastic": False}),
    ("dense", {"name": "dense", "dtype": "float32", "error_feedback": False}),
    ("dense:fp16", {"name": "dense", "dtype": "float16", "error_feedback": False}),
    ('{"name": "topk", "density": 0.2}', {"name": "topk", "density": 0.2, "values": "float32",
                                          "scope": "global", "error_feedback": True, "stochastic": False}),
    ("topk:0.003:sign:rice:warmup=6/0.25", {"name": "topk", "density": 0.003, "values": "sign", "scope": "global",
                                            "index_coding": "rice", "error_feedback": True, "stochastic": False,
                                            "warmup_rounds": 6, "warmup_density": 0.25}),
])
def test_codec_spec_parsing(text: str, expected: dict) -> None:
    assert spec_text.parse_codec(text) == expected


def test_codec_label_round_trips_the_new_options() -> None:
    text = "topk:0.003:sign:rice:warmup=6/0.25"
    assert spec_text.codec_label(spec_text.parse_codec(text)) == text
    for bad in ("topk:0.01:warmup=x", "topk:0.01:warmup=6/0.001", "dense:rice"):
        with pytest.raises(ValueError):
            spec_text.parse_codec(bad)


def test_randk_seed_is_left_to_the_coordinator() -> None:
    spec = spec_text.parse_codec("randk:0.05:int8:stochastic")
    assert spec["name"] == "randk" and spec["values"] == "int8" and spec["stochastic"] is True
    assert "seed" not in spec


@pytest.mark.parametrize("text,needle", [
    ("topk", "needs a density"), ("topk:abc", "density must be a number"), ("topk:2", "density must be in"),
    ("topk:0.01:int9", "unknown codec option 'int9'"), ("gzip", "unknown codec 'gzip'"),
    ("dense:stochastic", "unknown codec option"), ("{nope", "codec JSON is malformed"),
])
def test_bad_codec_specs_say_what_is_accepted(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        spec_text.parse_codec(text)


def test_codec_label_round_trips() -> None:
    for text in ("topk:0.01:int8", "dense:float16", "topk:0.05:float16:per_tensor", "randk:0.1:int8"):
        assert spec_text.parse_codec(spec_text.codec_label(spec_text.parse_codec(text))) == spec_text.parse_codec(text)


def test_partition_dataset_broker_specs(tmp_path: Path) -> None:
    assert spec_text.parse_partition("iid") == "iid"
    assert spec_text.parse_partition("dirichlet:0.3") == 0.3
    assert spec_text.parse_dataset("digits") == ("digits", None)
    assert spec_text.parse_dataset(f"imagefolder:{tmp_path}") == ("imagefolder", tmp_path)
    assert spec_text.parse_broker("mqtt://10.0.0.2:1883") == "mqtt://10.0.0.2:1883"
    assert spec_text.parse_broker("mqtts://broker.lan:8883") == "mqtts://broker.lan:8883"
    for bad, fn in [("dirichlet:0", spec_text.parse_partition), ("dirichlet", spec_text.parse_partition),
                    ("cifar10", spec_text.parse_dataset), ("mnist", spec_text.parse_dataset),
                    ("mqtt://host", spec_text.parse_broker), ("tcp://h:1", spec_text.parse_broker),
                    ("mqtts://host", spec_text.parse_broker), ("https://h:1", spec_text.parse_broker)]:
        with pytest.raises(ValueError):
            fn(bad)


# ------------------------------------------------------------------------------------ parser and help
def test_console_help_lists_every_command() -> None:
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0
    for command in ("coordinator", "client", "job", "export", "infer", "demo", "certs", "quick start"):
        assert command in result.stdout


@pytest.mark.parametrize("argv,example", [
    (["coordinator"], "fedsight coordinator --port 8080"), (["client"], "--partition dirichlet:0.5"),
    (["job", "create"], "--codec topk:0.01:int8"), (["job", "status"], "fedsight job status"),
    (["export"], "fedsight export --job"), (["infer"], "fedsight infer"), (["demo"], "fedsight demo --clients"),
    (["certs"], "fedsight certs --san"),
])
def test_every_command_has_help_with_an_example(argv: list[str], example: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert example in capsys.readouterr().out


def test_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["job", "create", "--codec", "topk:5"])
    assert exit_info.value.code == 2
    assert "density must be in" in capsys.readouterr().err


def test_job_body_sends_only_what_was_given() -> None:
    args = cli.build_parser().parse_args(["job", "create", "--name", "n", "--rounds", "4", "--codec",
                                          "topk:0.01:int8", "--lr", "0.1", "--eval", "none"])
    body = cli.job_body(args)
    assert body == {"name": "n", "rounds": 4, "codec": spec_text.parse_codec("topk:0.01:int8"),
                    "model": {"arch": "small_cnn"}, "train": {"lr": 0.1}, "eval": None}
    half = cli.build_parser().parse_args(["job", "create", "--mean", "0.5"])
    with pytest.raises(cli.CliError, match="--mean and --std go together"):
        cli.job_body(half)


def test_job_body_secure_aggregation_flags() -> None:
    parse = cli.build_parser().parse_args
    body = cli.job_body(parse(["job", "create", "--codec", "randk:0.1", "--secure-aggregation", "--epsilon", "8",
                               "--dp-clip", "fixed:1.0", "--secagg-neighbours", "8", "--secagg-phase-timeout", "20"]))
    assert body["secure_aggregation"] == {"neighbours": 8, "phase_timeout_s": 20.0}
    assert body["privacy"] == {"epsilon": 8.0, "clip": {"mode": "fixed", "bound": 1.0}}  # distributed DP
    bare = cli.job_body(parse(["job", "create", "--secure-aggregation", "--secagg-clip", "2",
                               "--secagg-noise-multiplier", "0.5"]))
    assert bare["secure_aggregation"] == {"clip": 2.0, "noise_multiplier": 0.5} and "privacy" not in bare
    assert cli.job_body(parse(["job", "create", "--secure-aggregation"]))["secure_aggregation"] == {}  # defaults
    assert "secure_aggregation" not in cli.job_body(parse(["job", "create"]))
    with pytest.raises(cli.CliError, match="--secagg-neighbours, --secagg-clip need --secure-aggregation"):
        cli.job_body(parse(["job", "create", "--secagg-neighbours", "4", "--secagg-clip", "1"]))


def test_job_body_evaluation_and_preprocessing_flags(tmp_path: Path) -> None:
    parse = cli.build_parser().parse_args
    photo = cli.job_body(parse(["job", "create", "--arch", "mobilenet_v3_small", "--num-classes", "5"]))
    assert "eval" not in photo and "input_scale" not in photo  # the server's photo defaults apply
    assert photo["model"] == {"arch": "mobilenet_v3_small", "num_classes": 5}
    body = cli.job_body(parse(["job", "create", "--eval", f"imagefolder:{tmp_path}", "--holdout", "0.2",
                               "--input-scale", "1023", "--class-names", "cat,dog"]))
    assert body["eval"] == {"dataset": "imagefolder", "path": str(tmp_path), "holdout_fraction": 0.2}
    assert body["input_scale"] == 1023.0 and body["class_names"] == ["cat", "dog"]
    assert cli.job_body(parse(["job", "create", "--holdout", "0.3"]))["eval"] == {"holdout_fraction": 0.3}
    assert cli.job_body(parse(["job", "create", "--eval", "digits"]))["eval"] == {"dataset": "digits"}
    with pytest.raises(cli.CliError, match="cannot go with --holdout"):
        cli.job_body(parse(["job", "create", "--eval", "none", "--holdout", "0.1"]))
    for bad in (["--eval", "imagenet"], ["--holdout", "0.9"]):
        with pytest.raises(SystemExit):
            parse(["job", "create", *bad])


def test_rounds_table_formats_each_round() -> None:
    rounds = [{"round": 1, "status": "closed", "accepted": 5, "rejected": 1, "uplink_bytes": 25_000,
               "rejected_bytes": 5_000, "junk": 562, "junk_bytes": 67_000_000,
               "downlink_bytes": 3_000_000, "compression_ratio": 40.0, "eval": {"accuracy": 0.875}, "duration_s": 1.25},
              {"round": 2, "status": "open", "accepted": 0, "rejected": 0, "uplink_bytes": 0,
               "compression_ratio": None, "eval": None, "duration_s": None}]
    rounds[0]["federated_eval"] = {"status": "ok", "accuracy": 0.8125, "num_samples": 40.0}
    lines = cli.format_table(*cli.rounds_table(rounds)).splitlines()
    assert lines[0].split() == ["round", "status", "acc/rej/junk", "uplink", "refused", "downlink", "vs", "raw", "fp32",
                                "accuracy", "device", "acc", "time"]
    # uplink is accepted updates only; rejected + junk bytes are shown apart
    assert lines[2].split() == ["1", "closed", "5/1/562", "25", "KB", "67", "MB", "3", "MB", "40.0x", "87.5%",
                                "81.2%", "1.2s"]
    assert lines[3].split() == ["2", "open", "0/0/0", "0", "B", "-", "0", "B", "-", "-", "-", "0.0s"]
def test_failed_evaluations_show_their_reason_not_a_dash() -> None:
    rounds = [{"round": 1, "status": "closed", "eval": {"error": "the digits set has 10 classes but the model has 5"},
               "federated_eval": {"status": "failed", "reason": "none of the 3 device(s) reported a held-out score"}},
              {"round": 2, "status": "closed", "eval": None,
               "federated_eval": {"status": "pending", "reason": "devices score this version in round 3"}}]
    _, rows = cli.rounds_table(rounds)
    assert rows[0][7:9] == ["failed", "failed"] and rows[1][7:9] == ["-", "pending"]
    assert cli.eval_summary({"eval": {"dataset": "imagefolder", "path": "/h", "holdout_fraction": 0.1}}) == \
        "server-side on /h + devices on 10% held-out data"
    assert cli.eval_summary({"eval": None}) == "none"
    final = {"status": "not_run", "reason": "final version"}
    assert cli.eval_notes([{"round": 5, "eval": None, "federated_eval": final}]) == [
        "round 5: device evaluation not run: final version"]
    assert cli.eval_notes([{"round": 5, "eval": {"accuracy": 0.9}, "federated_eval": final}]) == []
    notes = cli.eval_notes(rounds)
    assert notes == ["round 1: server evaluation failed: the digits set has 10 classes but the model has 5",
                     "round 1: device evaluation failed: none of the 3 device(s) reported a held-out score"]


# ------------------------------------------------------------------------------------- user errors
def test_unreachable_coordinator_is_one_line_and_a_hint() -> None:
    result = run_cli("job", "list", "--coordinator", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("fedsight: error: cannot reach the coordinator")
    assert lines[1].startswith("hint: ") and len(lines) == 2


def test_missing_files_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["infer", str(tmp_path / "nope.onnx"), str(tmp_path)]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert cli.main(["export", "--job", "j", "--out", str(tmp_path / "m.onnx"), "--data-dir", str(tmp_path)]) == 2
    assert "not a coordinator data directory" in capsys.readouterr().err
    assert cli.main(["client", "--num-partitions", "2", "--partition-index", "2"]) == 2
    assert "outside 0..1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ against a coordinator
@pytest.mark.integration
def test_job_commands_and_export_against_a_real_coordinator(coordinator, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca = coordinator.url, str(coordinator.ca)  # an https:// coordinator, verified against its CA
    monkeypatch.delenv("FEDSIGHT_TOKEN", raising=False)
    monkeypatch.delenv("FEDSIGHT_TOKEN_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./fedsight-data/operator-token here
    assert cli.main(["job", "list", "--coordinator", url, "--ca", ca]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "FEDSIGHT_TOKEN" in err
    token_file = str(coordinator.data_dir / "operator-token")
    assert cli.main(["job", "create", "--coordinator", url, "--ca", ca, "--token-file", token_file, "--name",
                     "cli-test", "--rounds", "3", "--clients-per-round", "2", "--min-clients", "1", "--codec",
                     "topk:0.05:int8"]) == 0
    job_id = capsys.readouterr().out.strip()
    monkeypatch.setenv("FEDSIGHT_TOKEN", coordinator.token)  # the rest find it in the environment
    job = coordinator.http.get(f"{coordinator.api}/jobs/{job_id}", timeout=10).json()
    assert job["config"]["codec"]["density"] == 0.05 and job["config"]["clients_per_round"] == 2

    assert cli.main(["job", "list", "--coordinator", url, "--ca", ca]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "topk:0.05:int8" in listing and "created" in listing

    assert cli.main(["job", "status", job_id, "--coordinator", url, "--ca", ca]) == 0
    assert "no rounds yet" in capsys.readouterr().out
    assert cli.main(["job", "status", "job-nope", "--coordinator", url, "--ca", ca]) == 2
    assert "HTTP 404" in capsys.readouterr().err

    out = tmp_path / "exports" / "model.onnx"
    assert cli.main(["export", "--job", job_id, "--out", str(out), "--coordinator", url, "--ca", ca]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["fedsight.job_id"] == job_id and props["fedsight.round"] == "0"
    assert props["fedsight.version"] == job["current_version"]

    local = tmp_path / "local.onnx"
    assert cli.main(["export", "--job", job_id, "--out", str(local), "--data-dir", str(coordinator.data_dir)]) == 0
    assert local.read_bytes() == out.read_bytes()  # the same cached, content-addressed export


@pytest.mark.integration
def test_secure_aggregation_job_through_the_cli(coordinator, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--secure-aggregation creates a secure (with --epsilon: distributed-DP) job; a combination the coordinator
    refuses comes back as its readable 400, and no job is created."""
    monkeypatch.setenv("FEDSIGHT_TOKEN", coordinator.token)
    base = ["job", "create", "--coordinator", coordinator.url, "--ca", str(coordinator.ca), "--rounds", "3",
            "--clients-per-round", "4", "--min-clients", "3", "--eval", "digits", "--secure-aggregation"]
    listed = coordinator.http.get(f"{coordinator.api}/jobs", timeout=10).json()["jobs"]
    assert cli.main([*base, "--codec", "topk:0.05"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "codec 'topk' is not offered under secure aggregation" in err, err
    assert cli.main([*base, "--codec", "randk:0.1", "--epsilon", "8", "--secagg-clip", "2"]) == 2
    assert "cannot be set with 'privacy'" in capsys.readouterr().err
    assert coordinator.http.get(f"{coordinator.api}/jobs", timeout=10).json()["jobs"] == listed  # nothing created

    assert cli.main([*base, "--codec", "randk:0.1", "--epsilon", "8", "--dp-clip", "fixed:1.0",
                     "--secagg-neighbours", "6", "--secagg-phase-timeout", "12"]) == 0
    job_id = capsys.readouterr().out.strip()
    job = coordinator.http.get(f"{coordinator.api}/jobs/{job_id}", timeout=10).json()
    sa, privacy = job["config"]["secure_aggregation"], job["config"]["privacy"]
    assert (sa["neighbours"], sa["phase_timeout_s"], sa["clip"]) == (6, 12.0, 1.0)
    assert sa["noise_multiplier"] == privacy["update_noise_multiplier"] > 0  # the devices add the DP noise
    assert job["privacy"]["noise_added_by"] == "devices" and job["privacy"]["target_epsilon"] == 8.0


@pytest.mark.integration
def test_client_list_and_revoke(coordinator, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSIGHT_TOKEN", coordinator.token)
    ca = str(coordinator.ca)
    reg = requests.post(f"{coordinator.api}/clients", json={"name": "doomed", "enroll_secret": coordinator.enroll_secret},
                        timeout=5, verify=ca).json()
    as_device = {"Authorization": f"Bearer {reg['token']}"}
    own = f"{coordinator.api}/clients/{reg['client_id']}"
    assert requests.get(own, headers=as_device, timeout=5, verify=ca).status_code == 200
    assert cli.main(["client", "list", "--coordinator", coordinator.url, "--ca", ca]) == 0
    assert reg["client_id"] in capsys.readouterr().out
    assert cli.main(["client", "revoke", reg["client_id"], "--coordinator", coordinator.url, "--ca", ca]) == 0
    assert "revoked" in capsys.readouterr().out
    assert requests.get(own, headers=as_device, timeout=5, verify=ca).status_code == 401  # the token is dead
    assert cli.main(["client", "list", "--coordinator", coordinator.url, "--ca", ca]) == 0
    assert reg["client_id"] not in capsys.readouterr().out
    assert cli.main(["client", "revoke", reg["client_id"], "--coordinator", coordinator.url, "--ca", ca]) == 2
    assert "HTTP 404" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- infer
@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    """A small_cnn trained for a few epochs on digits, exported; plus raw 0..16 digit PNGs to classify."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits

    from converters.onnx_export import export_model_file
    from edge_sdk.data import load_digits_split
    from edge_sdk.models import build_model
    from edge_sdk.params import state_to_arrays
    from edge_sdk.protocol.modelfile import dump_model
    from edge_sdk.trainer import LocalTrainer

    torch.manual_seed(0)
    train, _ = load_digits_split()
    model = build_model("small_cnn", 10, in_channels=1)
    LocalTrainer(device="cpu").train(model, train, {"epochs": 8, "lr": 0.05})
    meta = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8, "dataset": "digits",
            "normalization": {"mean": [0.5], "std": [0.5]}, "class_names": [f"digit-{i}" for i in range(10)],
            "input_scale": 16}
    out = tmp_path_factory.mktemp("infer")
    report = export_model_file(dump_model(state_to_arrays(model), meta), None, out / "onnx")
    images = out / "images"
    (images / "nested").mkdir(parents=True)
    digits = load_digits()
    labels = []
    for i in range(20):  # last samples: digits pixels are 0..16, stored as-is (fedsight.input_scale = 16)
        idx = len(digits.target) - 1 - i
        folder = images / "nested" if i % 2 else images
        Image.fromarray(digits.images[idx].astype(np.uint8)).save(folder / f"{i:02d}.png")
        labels.append(int(digits.target[idx]))
    return Path(report["path"]), images, labels


def test_infer_classifies_images_without_importing_torch(digits_model: tuple[Path, Path, list[int]]) -> None:
    model, images, labels = digits_model
    code = ("import json, sys; from coordinator.cli.main import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'infer imported torch'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "infer", str(model), str(images), "--json", "--top", "2"],
                            capture_output=True, text=True, timeout=120, env=child_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 20 and all(len(r["top"]) == 2 for r in rows)
    by_name = {Path(r["image"]).name: r for r in rows}
    predicted = [by_name[f"{i:02d}.png"]["label"] for i in range(20)]
    assert np.mean(np.array(predicted) == np.array(labels)) >= 0.85
    assert all(r["name"] == f"digit-{r['label']}" and 0 < r["probability"] <= 1 for r in rows)


def test_infer_table_output_and_bad_image(digits_model: tuple[Path, Path, list[int]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, images, _ = digits_model
    assert cli.main(["infer", str(model), str(images / "00.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["image", "prediction", "probability"] and "digit-" in out[2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert cli.main(["infer", str(model), str(broken)]) == 2
    assert "cannot read image" in capsys.readouterr().err
