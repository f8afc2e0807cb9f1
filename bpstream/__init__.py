"""bpstream: continuous, cuffless blood-pressure monitoring over MQTT, Kafka, a ResNet-LSTM and InfluxDB.

The package has one import root. Its sub-packages are the top-level folders of the repository:
``bpstream.shared`` (contracts, settings, signal processing, the model), ``bpstream.services`` (one
sub-package per deployable), ``bpstream.simulators`` (the wearable fleet) and ``bpstream.training``
(training, validation, export and benchmarks of the model).
"""

from __future__ import annotations

__version__ = "0.1.0"
