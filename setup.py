"""FedSight: federated fine-tuning of vision models on edge devices, with privacy built in.

``pip install fedsight`` is the torch-free device runtime (``edge_sdk.inference``, ``edge_sdk.live_model``,
``fedsight infer``); extras add the rest:

* ``[edge]``   a device that also trains (torch, torchvision, MQTT, HTTP client, scikit-learn digits)
* ``[server]`` the coordinator, ``fedsight demo``, ONNX export (Flask, cheroot, cryptography, amqtt,
  onnx, ...)
* ``[all]``    both; ``[test]`` adds what the test suite itself needs (``bash tests/run.sh`` installs
  ``.[all,test]``).
"""
from setuptools import find_packages, setup

INFERENCE = ["numpy>=1.26", "onnxruntime>=1.18", "pillow>=10"]
EDGE = [
    "torch>=2.4",
    "torchvision>=0.19",
    "paho-mqtt>=2.0",
    "requests>=2.31",
    "scikit-learn>=1.4",  # the bundled digits dataset (demo, simulated devices)
    "cryptography>=42",  # secure aggregation: X25519, HKDF, ChaCha20 masks, AES-GCM share envelopes
    "pycryptodome>=3.20",  # secure aggregation: Shamir secret sharing (Crypto.Protocol.SecretSharing)
]
SERVER = EDGE + [
    "flask>=3.0",
    "cheroot>=10.0",  # the HTTPS server (coordinator/api/http_server.py)
    "cryptography>=42",  # the private CA and server certificates (coordinator/security/certs.py)
    "amqtt>=0.12.1,<0.13",  # embedded_acl.GuardedBroker overrides a 0.12.1 internal
    "onnx>=1.16",
    "onnxscript>=0.1",  # torch.onnx needs it to export
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "dp-accounting>=0.4",  # privacy accountant of DP jobs (coordinator/privacy/accountant.py)
    "psutil>=5.9",
]
TEST = ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "scipy>=1.11"]  # scipy: uniformity and DP noise tests

setup(
    name="fedsight",
    version="0.1.0",
    description="Federated fine-tuning of vision models on edge devices over MQTT, exported to ONNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["edge_sdk", "edge_sdk.*", "coordinator", "coordinator.*",
                                    "converters", "converters.*"]),
    install_requires=INFERENCE,
    extras_require={
        "inference": [],  # the base install; kept so `pip install "fedsight[inference]"` still works
        "edge": EDGE,
        "server": SERVER,
        "all": sorted(set(EDGE + SERVER)),
        "test": TEST,
    },
    entry_points={"console_scripts": ["fedsight=coordinator.cli.main:main"]},
)
