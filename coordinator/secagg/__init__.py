"""Secure aggregation, coordinator side: the round state machine (``server.py``), the neighbour graph
(``graph.py``), the job field (``config.py``) and the MQTT round flow (``flow.py``). The device side and the
wire format live in ``edge_sdk/secagg`` and ``edge_sdk/protocol/secagg_wire.py``."""
