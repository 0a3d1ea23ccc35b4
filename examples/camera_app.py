"""A camera app that classifies every frame with the job's live global model, hot-swapped as training goes on.

    python examples/camera_app.py --coordinator https://127.0.0.1:8080 --ca fedsight-data/tls/ca.pem \
        --job JOB_ID frames/ [--train]

Frames come from a folder of images (sorted; with ``--train`` the sub-folder name is the user-confirmed
label, as in ``imagefolder``) or from a video file when OpenCV (``cv2``) is installed. Without ``--train``
the app needs only ``pip install fedsight`` (numpy, onnxruntime, pillow: no torch) and follows new versions by
polling. With ``--train`` (``pip install "fedsight[edge]"``) it also takes part in training through
``EdgeClient`` and swaps models the moment the coordinator announces them. Either way every frame is
classified by exactly one model version, printed next to the prediction; a bad download keeps the old model.
With the secure defaults (docs/security.md) pass ``--token`` (ONNX exports and the job spec are operator
endpoints) and, for ``--train``'s first run, set ``$FEDSIGHT_ENROLL_SECRET``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.live_model import LiveModel

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
log = logging.getLogger("camera_app")


def frames_from(source: Path) -> Iterator[tuple[np.ndarray, str]]:
    """(HxWxC uint8 frame, label-or-empty) from a folder of images or a video file."""
    if source.is_dir():
        from PIL import Image

        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(path) as img:
                yield np.asarray(img.convert("RGB")), path.parent.name if path.parent != source else ""
        return
    import cv2  # only for video files

    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise SystemExit(f"cannot open video {source}")
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            yield bgr[:, :, ::-1].copy(), ""
    finally:
        capture.release()


def start_training(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """EdgeClient + SampleBuffer shaped like the job's model (torch from here on)."""
    import requests

    from edge_sdk import EdgeClient, SampleBuffer

    # the job's spec is an operator endpoint (--token); the device enrolls with $FEDSIGHT_ENROLL_SECRET
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    resp = requests.get(f"{args.coordinator}/api/v1/jobs/{args.job}", timeout=30, headers=headers,
                        verify=args.ca or True)
    if not resp.ok:
        raise SystemExit(f"cannot read job {args.job}: HTTP {resp.status_code} {resp.text[:200]} (pass --token)")
    cfg = resp.json()["config"]
    model = cfg["model"]
    buffer = SampleBuffer(capacity=args.buffer, image_size=model["image_size"], channels=model["in_channels"],
                          normalization=cfg.get("normalization"))
    client = EdgeClient(args.coordinator, dataset=buffer, cache_dir=args.cache_dir, jobs=[args.job],
                        ca_file=args.ca)
    return client, buffer, list(cfg.get("class_names") or [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="folder of frames, or a video file (needs cv2)")
    p.add_argument("--coordinator", default="https://127.0.0.1:8080")
    p.add_argument("--ca", default=os.environ.get("FEDSIGHT_CA"), metavar="CA.pem",
                   help="the coordinator's CA file, e.g. fedsight-data/tls/ca.pem (default: $FEDSIGHT_CA)")
    p.add_argument("--job", required=True, metavar="JOB_ID")
    p.add_argument("--train", action="store_true", help="also fine-tune on labelled frames (needs torch)")
    p.add_argument("--token", help="token for ONNX downloads: exports are operator-only (docs/security.md), so the "
                                   "operator token, e.g. $(cat fedsight-data/operator-token)")
    p.add_argument("--cache-dir", default="~/.cache/fedsight/camera-app")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between version checks (default: 10)")
    p.add_argument("--fps", type=float, default=0.0, help="pace frames like a camera (0: as fast as possible)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0: whole source)")
    p.add_argument("--loop", action="store_true", help="replay the source until --max-frames")
    p.add_argument("--buffer", type=int, default=2000, help="training buffer capacity with --train")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    client = buffer = None
    labels: list[str] = []
    if args.train:
        client, buffer, labels = start_training(args)
    token = args.token or (client.token if client else None)
    live = LiveModel(args.coordinator, args.job, token=token, poll_s=args.poll, ca_file=args.ca,
                     cache_dir=Path(args.cache_dir).expanduser() / "live").start()
    if client is not None:  # announced versions go live at once, polling is the fallback
        client.callbacks.on_model_updated = live.on_model_updated
        client.callbacks.on_job_finished = live.on_job_finished
        client.start()
    if not live.wait_ready(120):
        log.error("no model for job %s after 120 s: %s", args.job, live.last_error)
        return 1
    shown, last_version = 0, None
    try:
        while True:
            for frame, label in frames_from(args.source):
                result = live.predict(frame)
                pred = result.predictions[0]
                if result.version != last_version:
                    log.info("model %s (round %d) is live", result.version[:12], result.round)
                    last_version = result.version
                log.info("frame %d: %s (%.3f) [model %s]", shown, pred.name, pred.probability, result.version[:12])
                if buffer is not None and label in labels:
                    buffer.add(frame, labels.index(label))
                shown += 1
                if args.max_frames and shown >= args.max_frames:
                    return 0
                if args.fps > 0:
                    time.sleep(1.0 / args.fps)
            if not args.loop:
                return 0
    except KeyboardInterrupt:
        return 130
    finally:
        live.stop()
        if client is not None:
            client.stop()


if __name__ == "__main__":
    sys.exit(main())
