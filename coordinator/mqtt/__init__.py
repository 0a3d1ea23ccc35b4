"""MQTT side of the coordinator: the embedded broker, the bridge to the round engine, device presence."""
