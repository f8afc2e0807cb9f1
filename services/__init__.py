"""The deployables: one sub-package per service (bridge, processor, inference, alerting, writer)."""
