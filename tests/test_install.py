"""Installs match the README: the base install is torch-free, extras cover every import, run.sh installs them."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn", "paho": "paho-mqtt", "PIL": "pillow", "cv2": "opencv-python",
                "Crypto": "pycryptodome", "dp_accounting": "dp-accounting"}
OPTIONAL = {"cv2"}  # examples/camera_app.py reads video files with it when present; nothing requires it
# Packages only the training device / coordinator need: none may be pulled in by the base install.
NOT_BASE = {"torch", "torchvision", "paho", "requests", "flask", "cheroot", "cryptography", "amqtt", "onnx",
            "onnxscript", "sklearn", "tqdm", "matplotlib", "psutil", "werkzeug", "Crypto", "dp_accounting"}


def setup_kwargs() -> dict[str, Any]:
    """What setup.py hands to setuptools.setup(), without building anything."""
    captured: dict[str, Any] = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
            exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
    return captured


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Top-level modules imported anywhere under ``folders`` that are neither stdlib nor this project."""
    own = {"edge_sdk", "coordinator", "converters", "tests", "benchmarks", "examples"}
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in own:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_base_install_is_torch_free_and_extras_cover_every_import() -> None:
    kw = setup_kwargs()
    base, extras = names(kw["install_requires"]), {k: names(v) for k, v in kw["extras_require"].items()}
    assert base == {"numpy", "onnxruntime", "pillow"}
    assert not base & {DISTRIBUTION.get(m, m) for m in NOT_BASE}
    assert {"torch", "torchvision", "paho-mqtt", "requests"} <= extras["edge"]
    assert {"cryptography", "pycryptodome"} <= extras["edge"]  # a training device runs secure aggregation
    assert {"flask", "cheroot", "cryptography", "amqtt", "onnx"} <= extras["server"]
    assert "waitress" not in extras["server"]  # replaced by cheroot, which terminates TLS itself
    assert extras["all"] == extras["edge"] | extras["server"]
    installed = base | extras["all"] | extras["test"]
    missing = {m: sorted(where)[:3] for m, where in third_party_imports(
        "edge_sdk", "coordinator", "converters", "tests", "benchmarks", "examples").items()
        if DISTRIBUTION.get(m, m).lower() not in installed and m not in OPTIONAL
        and m not in ("werkzeug",)}  # werkzeug comes with flask
    assert not missing, f"imported but not installed by `bash tests/run.sh`: {missing}"
    # The device runtime itself imports only the base set.
    device = third_party_imports("edge_sdk")
    torch_free = {"inference.py", "live_model.py", "coordinator_origin.py", "frames.py"}
    for module, where in device.items():
        if any(Path(w).name in torch_free for w in where):
            assert DISTRIBUTION.get(module, module).lower() in base, (module, where)


def test_run_sh_installs_all_extras_and_the_readme_install_lines_name_real_extras() -> None:
    run_sh = (ROOT / "tests" / "run.sh").read_text()
    assert re.search(r"pip install[^\n]*-e '\.\[all,test\]'", run_sh.replace("$PIP", "pip install")), run_sh
    extras = set(setup_kwargs()["extras_require"])
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    used = {(doc.name, e) for doc in docs for group in re.findall(r"""pip install[^\n`]*?[."']\[([a-z,]+)\]""",
                                                                  doc.read_text()) for e in group.split(",")}
    assert used, "README should show how to install"
    assert {e for _, e in used} <= extras, used


def _tiny_onnx(path: Path) -> None:
    w = np.eye(3, 16, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], transB=1)], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(3, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model.metadata_props.add(key="fedsight.class_names", value='["a", "b", "c"]')
    path.write_bytes(model.SerializeToString())


BLOCKER = f"""
import sys
BLOCK = {sorted(NOT_BASE)!r}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(name + " is not part of the base install", name=name)
sys.meta_path.insert(0, Blocker())
"""


def test_inference_live_model_and_fedsight_infer_work_with_only_the_base_install(tmp_path: Path) -> None:
    from PIL import Image

    model = tmp_path / "m.onnx"
    _tiny_onnx(model)
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "white.png")
    code = BLOCKER + f"""
import numpy as np
from edge_sdk.inference import OnnxClassifier
from edge_sdk.live_model import LiveModel
from edge_sdk.coordinator_origin import CoordinatorOrigin
pred = OnnxClassifier({str(model)!r}).predict(np.full((4, 4), 255, np.uint8))[0]
live = LiveModel("http://127.0.0.1:9", "job-1")
assert live.version is None and pred.name == "a", pred
sys.argv = ["fedsight", "infer", {str(model)!r}, {str(tmp_path / "white.png")!r}]
from coordinator.cli.main import main
code = main()
assert not set(BLOCK) & {{m.split(".")[0] for m in sys.modules}}, sorted(set(BLOCK) & set(sys.modules))
sys.exit(code)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"white\.png\s+a\s+0\.\d+", out.stdout), out.stdout


def test_commands_that_need_an_extra_say_which_one() -> None:
    code = BLOCKER + """
from coordinator.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
    for argv, extra in ((["client"], "edge"), (["coordinator", "--port", "0"], "server"), (["job", "list"], "server")):
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, (argv, out.stderr[-2000:])
        assert f'pip install "fedsight[{extra}]"' in out.stderr and "Traceback" not in out.stderr, out.stderr
