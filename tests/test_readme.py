"""The commands in README.md and docs/cli.md are executed here, so they cannot rot.

Every ``fedsight ...`` line in their code blocks is parsed by the real argument parser, and README's
"Run it for real" block is run end to end: whatever its lines say, scaled down (2 rounds, 2 devices, 32-pixel
images, a tiny generated ImageFolder as ``photos/``) and moved onto loopback (host names become 127.0.0.x,
ports become free ones), over TLS as the README's coordinator serves it: every client verifies the CA the
coordinator writes into its data directory (``export FEDSIGHT_CA=...`` in the README is applied here too).
The test waits for the job to finish before the ``export`` line, as a reader would.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from coordinator.cli.main import build_parser
from tests.support.processes import ROOT, child_env, cli, free_port, stop_process

DOCS = [ROOT / "README.md", ROOT / "docs" / "cli.md", ROOT / "examples" / "README.md"]
DEVICES, ROUNDS, IMAGE_SIZE = 2, 2, 32
PUBLIC_HOST = "127.0.0.3"


@dataclass
class Command:
    argv: list[str]          # starts with "fedsight" (or another program, e.g. pip)
    where: str               # file:line, for messages
    expect_usage_error: bool = False


@dataclass
class Block:
    lang: str
    start: int
    lines: list[str] = field(default_factory=list)


def code_blocks(path: Path) -> list[Block]:
    blocks, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = Block(line[3:].strip(), number)
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.lines.append(line)
    return blocks


def commands(path: Path, block: Block) -> list[Command]:
    """Shell lines of a block (``$ `` prompts, ``\\`` continuations, ``&&`` chains, ``#`` comments handled);
    a command whose next output line is an argparse usage error is expected to fail."""
    out: list[Command] = []
    lines, i = block.lines, 0
    prompted = any(ln.startswith("$ ") for ln in lines)
    while i < len(lines):
        number, line = block.start + 1 + i, lines[i]
        i += 1
        if prompted:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        if not re.match(r"\s*(fedsight|pip|bash|python)\b", line):
            continue
        words = [w for w in shlex.split(line, comments=True) if w != "&"]  # `cmd &`: run in the background
        nxt = lines[i] if i < len(lines) else ""
        usage_error = bool(re.match(r"fedsight[\w ]*: error: argument", nxt))
        chunk: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if chunk:
                    out.append(Command(chunk, f"{path.name}:{number}", usage_error))
                chunk = []
            else:
                chunk.append(word)
    return out


def all_fedsight_commands() -> list[Command]:
    return [c for doc in DOCS for b in code_blocks(doc) if b.lang in ("", "bash", "sh", "console")
            for c in commands(doc, b) if c.argv[0] == "fedsight"]


def parse(argv: list[str]) -> object:
    return build_parser().parse_args(argv[1:])


def test_every_fedsight_command_in_the_docs_parses(capsys: pytest.CaptureFixture[str]) -> None:
    found = all_fedsight_commands()
    assert len(found) >= 15, [c.where for c in found]  # the extraction itself works
    assert {c.argv[1] for c in found} >= {"coordinator", "client", "job", "export", "infer", "demo"}
    for cmd in found:
        if cmd.expect_usage_error:
            with pytest.raises(SystemExit) as exc:
                parse(cmd.argv)
            assert exc.value.code == 2, cmd.where
        else:
            try:
                parse(cmd.argv)
            except SystemExit:
                pytest.fail(f"{cmd.where}: `{shlex.join(cmd.argv)}` does not parse: {capsys.readouterr().err}")


def test_readme_first_screen_is_the_demo_and_the_tests() -> None:
    first = code_blocks(ROOT / "README.md")[0]
    shown = [c.argv for c in commands(ROOT / "README.md", first)]
    assert [ln for ln in first.lines if ln.strip()] and len([ln for ln in first.lines if ln.strip()]) == 2
    assert shown[0][:2] == ["pip", "install"] and shown[1] == ["fedsight", "demo"] and shown[2] == [
        "bash", "tests/run.sh"]
    parse(shown[1])


# ------------------------------------------------------------------------------------ "Run it for real"
def run_it_for_real() -> list[Command]:
    text = (ROOT / "README.md").read_text()
    section = text.index("## Run it for real")
    block = next(b for b in code_blocks(ROOT / "README.md")
                 if b.start > text[:section].count("\n") + 1 and b.lang == "bash")
    return commands(ROOT / "README.md", block)


def make_photos(folder: Path, classes: int, per_class: int = 12) -> None:
    """A tiny ImageFolder: one colour and stripe pattern per class, with noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        (folder / f"class_{k}").mkdir(parents=True)
        base = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        base[..., k % 3] = 200
        base[:, :: k + 2, :] += 50
        for j in range(per_class):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"class_{k}" / f"{j}.png")


class Runner:
    """Runs README lines in a scratch folder with loopback addresses and scaled-down sizes."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.http_port, self.mqtt_port = free_port(), free_port()
        self.public = f"https://{PUBLIC_HOST}:{self.http_port}"
        self.local = f"https://127.0.0.1:{self.http_port}"
        self.ca: Path | None = None  # the coordinator's tls/ca.pem, once it wrote it
        self.env = {**child_env(), "FEDSIGHT_COORDINATOR": self.local}
        self.background: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.job_id: str | None = None
        self.coordinator_started = False

    def localize(self, argv: list[str]) -> list[str]:
        """Host names -> loopback aliases, README ports -> free ports, sizes scaled down, JOB_ID -> the job."""
        out = []
        for word in argv:
            word = re.sub(r"https?://[\w.-]+:\d+", self.public, word)
            word = re.sub(r"(mqtts?)://[\w.-]+:\d+", rf"\1://127.0.0.1:{self.mqtt_port}", word)
            if word == "JOB_ID":
                assert self.job_id, "JOB_ID used before `job create`"
                word = self.job_id
            out.append(word)
        return out

    @staticmethod
    def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
        if flag in argv:
            argv = list(argv)
            argv[argv.index(flag) + 1] = value
            return argv
        return [*argv, flag, value]

    def run(self, argv: list[str], timeout: float = 180) -> str:
        out = subprocess.run(cli(*argv[1:]), cwd=self.workdir, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"`{shlex.join(argv)}` failed ({out.returncode}):\n{out.stderr[-3000:]}"
        return out.stdout

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cli(*argv[1:]), cwd=self.workdir, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT)
        self.background.append(proc)
        return proc

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.logs if p.exists())

    def coordinator(self, argv: list[str]) -> None:
        if self.coordinator_started:  # later coordinator lines are alternatives (checked by the parse test)
            return
        argv = self.set_flag(self.set_flag(argv, "--port", str(self.http_port)), "--mqtt-port", str(self.mqtt_port))
        if "--public-url" in argv:  # "devices on other hosts": they only ever get the public alias
            self.env["FEDSIGHT_COORDINATOR"] = self.public
        proc = self.spawn(argv, "coordinator")
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, self.tail()
            self.ca = next(self.workdir.glob("*/tls/ca.pem"), None)
            try:
                if self.ca is not None and requests.get(f"{self.local}/api/v1/health", timeout=1,
                                                        verify=str(self.ca)).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, self.tail()
            time.sleep(0.2)
        self.coordinator_started = True
        exported = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("export FEDSIGHT_CA=")]
        assert exported, "README: the CLI needs the coordinator's CA (export FEDSIGHT_CA=...)"
        ca = (self.workdir / exported[0].split("=", 1)[1]).resolve()
        assert ca == self.ca.resolve(), (ca, self.ca)  # the README names the file the coordinator wrote
        self.env["FEDSIGHT_CA"] = str(ca)

    def job_create(self, argv: list[str]) -> None:
        argv = self.set_flag(self.set_flag(argv, "--rounds", str(ROUNDS)), "--clients-per-round", str(DEVICES))
        argv = self.set_flag(argv, "--image-size", str(IMAGE_SIZE))
        args = parse(argv)
        make_photos(self.workdir / "photos", args.num_classes)
        eval_kind, _, eval_path = next((a for a in argv if a.startswith("imagefolder:")), "").partition(":")
        if eval_kind == "imagefolder":  # the README's held-out set, generated like the photos
            make_photos(self.workdir / eval_path, args.num_classes, per_class=4)
        self.job_id = self.run(argv).strip().splitlines()[-1]
        assert re.fullmatch(r"job-[0-9a-f]+", self.job_id), self.job_id

    def clients(self, argv: list[str]) -> None:
        argv = self.set_flag(argv, "--image-size", str(IMAGE_SIZE))
        for i in range(DEVICES):
            device = self.set_flag(self.set_flag(argv, "--num-partitions", str(DEVICES)), "--partition-index", str(i))
            self.spawn(self.set_flag(device, "--cache-dir", f"device-{i}"), f"device-{i}")

    def operator(self) -> dict[str, str]:
        """The operator token the coordinator wrote into its data dir (as the CLI finds it)."""
        (path,) = self.workdir.glob("*/operator-token")
        return {"Authorization": f"Bearer {path.read_text().strip()}"}

    def wait_finished(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = requests.get(f"{self.local}/api/v1/jobs/{self.job_id}", timeout=5, headers=self.operator(),
                               verify=str(self.ca)).json()
            if job["status"] in ("finished", "failed"):
                assert job["status"] == "finished", (job, self.tail())
                return job
            assert time.monotonic() < deadline, f"job not finished: {job}\n{self.tail()}"
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.background:  # SIGTERM to all at once: devices go offline cleanly in parallel
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.background):
            stop_process(proc)


@pytest.fixture()
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path)
    yield r
    r.stop()


@pytest.mark.integration
def test_run_it_for_real_end_to_end(runner: Runner) -> None:
    steps = run_it_for_real()
    fedsight = [c.argv[1] for c in steps if c.argv[0] == "fedsight"]
    assert {"coordinator", "job", "client", "export", "infer"} <= set(fedsight), fedsight
    outputs: dict[str, str] = {}
    for step in steps:
        if step.argv[0] != "fedsight":
            assert step.argv[:2] == ["pip", "install"], step  # installs are checked by tests/test_install.py
            continue
        argv = runner.localize(step.argv)
        command = argv[1] if argv[1] != "job" else f"job {argv[2]}"
        if command == "coordinator":
            runner.coordinator(argv)
        elif command == "job create":
            runner.job_create(argv)
        elif command == "client":
            runner.clients(argv)
        else:
            if command in ("export", "infer"):
                runner.wait_finished()
            outputs[command] = runner.run(argv)
    job = runner.wait_finished()
    assert job["current_round"] == ROUNDS
    rounds = requests.get(f"{runner.local}/api/v1/jobs/{runner.job_id}/rounds", timeout=5,
                          headers=runner.operator(), verify=str(runner.ca)).json()["rounds"]
    assert [r["accepted"] for r in rounds] == [DEVICES] * ROUNDS
    assert "wrote model.onnx" in outputs["export"] and (runner.workdir / "model.onnx").is_file()
    images = sorted((runner.workdir / "photos").rglob("*.png"))
    assert sum(f"{p.relative_to(runner.workdir)}" in outputs["infer"] for p in images) == len(images)
    advertised = any("--public-url" in c.argv for c in steps if c.argv[:2] == ["fedsight", "coordinator"])
    for i in range(DEVICES):  # with a public URL, devices use only the advertised addresses
        log = (runner.workdir / f"device-{i}.log").read_text()
        assert f"online via mqtts://{PUBLIC_HOST if advertised else '127.0.0.1'}:" in log, log[-2000:]


def test_every_example_in_the_help_texts_parses() -> None:
    """`fedsight COMMAND --help` epilogs are docs too."""
    import argparse

    def parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    joined: list[str] = []
    for p in parsers(build_parser()):
        for line in (p.epilog or "").splitlines():
            line = line.strip()
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1] + " " + line
            elif line.startswith("fedsight "):
                joined.append(line)
    assert len(joined) >= 10, joined
    for line in joined:
        parse(shlex.split(line, comments=True))
