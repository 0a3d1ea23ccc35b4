"""Rounds and aggregation: job specs, the round engine and per-job runners, validation and strategies."""
