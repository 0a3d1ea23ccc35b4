"""FedSight: federated fine-tuning of vision models on edge devices, with privacy built in."""
from setuptools import find_packages, setup

setup(
    name="fedsight",
    version="0.1.0",
    description="Federated fine-tuning of vision models on edge devices over MQTT, exported to ONNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["edge_sdk", "edge_sdk.*", "coordinator", "coordinator.*",
                                    "converters", "converters.*"]),
    install_requires=[
        "numpy>=1.26",
        "torch>=2.4",
        "torchvision>=0.19",
        "paho-mqtt>=2.0",
        "requests>=2.31",
        "flask>=3.0",
        "cheroot>=10.0",
        "cryptography>=42",
        "amqtt>=0.11",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "scikit-learn>=1.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pillow>=10",
        "psutil>=5.9",
    ],
    extras_require={
        # A device that only runs inference needs numpy + onnxruntime (+ pillow for image files).
        "inference": ["numpy>=1.26", "onnxruntime>=1.18", "pillow>=10"],
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "onnxscript>=0.1"],
    },
    entry_points={"console_scripts": ["fedsight=coordinator.cli.main:main"]},
)
