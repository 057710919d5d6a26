"""Bridges: verdicts from the `results` topic to the line's other systems (MQTT, OPC UA), so
a PLC can act on a reject signal. A service like the worker and the sink: it imports the core
(linewatch/) and no other service, and never torch."""
