"""A camera app joins FedSight federated fine-tuning: the ~10 lines an app developer writes.

Run a coordinator and a job first (`fedsight coordinator`, `fedsight job create --start ...`), then
`python examples/embed_sdk.py [COORDINATOR_URL]`. `camera_frames()` stands in for your capture loop.
"""
import sys
import time

from edge_sdk import EdgeClient, SampleBuffer


def camera_frames():
    """Stand-in camera: scikit-learn's 8x8 digits (raw pixels 0..16) with the user-confirmed label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for image, label in zip(digits.images, digits.target):
        time.sleep(0.01)
        yield image.astype("uint8"), int(label)


# --- the app developer's code -----------------------------------------------------------------------
buffer = SampleBuffer(capacity=512, image_size=8, channels=1,                   # what the job's model takes
                      normalization={"mean": [0.5], "std": [0.5]}, input_scale=16)
client = EdgeClient(sys.argv[1] if len(sys.argv) > 1 else "https://127.0.0.1:8080",
                    dataset=buffer, cache_dir="~/.cache/fedsight/camera-app",
                    ca_file=sys.argv[2] if len(sys.argv) > 2 else "fedsight-data/tls/ca.pem")  # coordinator's CA
client.start()                                   # online now; selected once the buffer holds frames
try:
    for frame, label in camera_frames():         # frames never leave the device
        buffer.add(frame, label)                 # training runs in the background when selected
finally:
    client.stop()                                # announce offline, disconnect
