"""A camera app joins FedSight federated fine-tuning: the ~10 lines an app developer writes.

Run a coordinator and a job first (`fedsight coordinator`, `fedsight job create --eval digits --start`), then
`FEDSIGHT_ENROLL_SECRET=$(cat fedsight-data/enroll-secret) python examples/embed_sdk.py [COORDINATOR_URL [CA_FILE]]`
(the secret is needed for the first registration only). `camera_frames()` stands in for your capture loop. The app
passes raw frames only: the SampleBuffer is configured from the job's model (size, channels, mean/std, pixel
scale), and a job whose model expects something the buffer was pinned to otherwise is refused with the differences.
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
buffer = SampleBuffer(capacity=512)              # preprocessing comes from the job's model
client = EdgeClient(sys.argv[1] if len(sys.argv) > 1 else "https://127.0.0.1:8080",
                    dataset=buffer, cache_dir="~/.cache/fedsight/camera-app",
                    ca_file=sys.argv[2] if len(sys.argv) > 2 else "fedsight-data/tls/ca.pem")  # coordinator's CA
client.start()                                   # online now; selected once the buffer holds frames
try:
    for frame, label in camera_frames():         # frames never leave the device
        buffer.add(frame, label)                 # training runs in the background when selected
finally:
    client.stop()                                # announce offline, disconnect
