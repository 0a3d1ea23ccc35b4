"""Secure aggregation, device side (Bonawitz et al. 2017, with SecAgg+ style neighbour graphs).

The coordinator learns only the sum of the round's (clipped, fixed-point) updates: every device adds
pairwise masks that cancel in the sum plus a self mask whose seed is Shamir-shared with its neighbours, so
the coordinator can remove the masks of devices that dropped after masking, and of survivors, but never
both for one device. Pure protocol, no I/O: ``device.SecAggDevice`` turns coordinator messages
(``edge_sdk.protocol.secagg_wire``) into replies. The coordinator's half is ``coordinator/secagg/``.
"""
