"""What the model expects of a window. The processor and the model agree through these values.

An exported artefact carries its own copy in its metadata; services read the artefact's values and fall
back to these defaults only when no model is loaded.
"""

from __future__ import annotations

from typing import Final

MODEL_SAMPLE_RATE: Final = 125.0
WINDOW_SECONDS: Final = 8.0
HOP_SECONDS: Final = 2.0
#: Channel order of the model's input tensor ``(batch, channel, time)``.
MODEL_CHANNELS: Final = ("ecg", "ppg")
WINDOW_SAMPLES: Final = int(MODEL_SAMPLE_RATE * WINDOW_SECONDS)
