"""FedSight protocol v1: topics, wire format, model files and codecs (numpy only, no torch)."""
from .errors import ProtocolError

__all__ = ["ProtocolError"]
