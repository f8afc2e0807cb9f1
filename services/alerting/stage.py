"""Alerting's pure stage: per-patient ``AlertDetector`` state, estimates in, alerts out.

The alert logic itself is ``bpstream.shared.anomaly.AlertDetector`` (the same logic the model's evaluation
uses); this module only keeps one detector per device, remembers which ones changed since the last state
flush, merges state restored from the compacted ``alerting.state`` topic, and evicts the detectors of
devices that fell silent (``evict_silent``). Nothing here does I/O and nothing reads a wall clock: silence is
measured in record time, the newest window end any detector here accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bpstream.shared.anomaly import AlertConfig, AlertDetector
from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import Alert, CuffReading, Estimate
from bpstream.shared.topics import device_key


class AlertingState:
    """Detectors of every patient this instance has seen, and the set changed since the last flush."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        self.detectors: dict[str, AlertDetector] = {}
        self.dirty: set[str] = set()
        #: Estimates ignored because they were dated too far ahead of their receipt (all detectors, ever).
        self.future_ignored = 0
        #: Record-time clock: the newest window end any detector here accepted (restored states included).
        self.newest_ns = 0
        #: Device time of each device's newest cuff reading (a detector fed only by cuff readings has no window).
        self.cuff_seen: dict[str, int] = {}
        #: Newest window end of each device's estimates, the ones the detector ignores included (unscored or
        #: withheld windows leave ``last_ns`` where it was, yet the device is not silent).
        self.window_seen: dict[str, int] = {}

    def apply(self, estimates: Iterable[Estimate]) -> list[Alert]:
        """Feed estimates (in Kafka order per device); return the alerts they raise or resolve."""
        alerts: list[Alert] = []
        for estimate in estimates:
            key = device_key(estimate.clinic_id, estimate.device_id)
            detector = self.detectors.get(key)
            if detector is None:
                detector = self.detectors[key] = AlertDetector(self.config)
            before = detector.state.future_windows
            alerts.extend(detector.update(estimate))
            if detector.state.future_windows == before:  # a future-dated window never moves a clock
                end_ns = int(estimate.window_end_ns)
                if end_ns > self.window_seen.get(key, -1):
                    self.window_seen[key] = end_ns
            self.future_ignored += detector.state.future_windows - before
            self.newest_ns = max(self.newest_ns, detector.state.last_ns)
            self.dirty.add(key)
        return alerts

    def apply_cuff(self, readings: Iterable[CuffReading], *, raise_alerts: bool = True) -> list[Alert]:
        """Feed cuff readings (devices this instance owns); return the alerts they raise or resolve."""
        alerts: list[Alert] = []
        for reading in readings:
            key = device_key(reading.clinic_id, reading.device_id)
            detector = self.detectors.get(key)
            if detector is None:
                detector = self.detectors[key] = AlertDetector(self.config)
            alerts.extend(detector.cuff(reading, raise_alerts=raise_alerts))
            self.cuff_seen[key] = max(self.cuff_seen.get(key, 0), reading.time_ns)
            self.dirty.add(key)
        return alerts

    def take_dirty(self) -> dict[str, bytes]:
        """Serialised state of every detector changed since the last call (to write to the state topic)."""
        saved = {device: self.detectors[device].to_bytes() for device in sorted(self.dirty)}
        self.dirty.clear()
        return saved

    def merge(self, saved: Mapping[str, bytes]) -> list[str]:
        """Adopt saved states that are newer than what is in memory; return devices whose state was unreadable.

        After a rebalance or restart the saved state is the one that matches the committed offsets; a
        detector already ahead in memory keeps its state (the detector ignores replayed estimates anyway).
        """
        bad: list[str] = []
        for device, data in saved.items():
            try:
                restored = AlertDetector.from_bytes(data, self.config)
            except DecodeError:
                bad.append(device)
                continue
            current = self.detectors.get(device)
            if current is None or restored.state.last_ns > current.state.last_ns:
                self.detectors[device] = restored
                self.newest_ns = max(self.newest_ns, restored.state.last_ns)
        return bad

    def evict_silent(self, max_silence_ns: int) -> list[str]:
        """Drop the detectors of devices silent for more than ``max_silence_ns`` of record time (newest window
        or cuff reading older than ``newest_ns - max_silence_ns``); return their keys, for the caller to write
        tombstones. ``max_silence_ns <= 0`` evicts nothing. An evicted device that comes back starts afresh
        (new baseline; an episode still open when it fell silent is not resumed)."""
        if max_silence_ns <= 0 or self.newest_ns <= 0:
            return []
        horizon = self.newest_ns - max_silence_ns
        gone = [key for key, det in self.detectors.items()
                if max(det.state.last_ns, self.window_seen.get(key, -1), self.cuff_seen.get(key, -1)) < horizon]
        for key in gone:
            del self.detectors[key]
            self.dirty.discard(key)
            self.cuff_seen.pop(key, None)
            self.window_seen.pop(key, None)
        return gone

    def active_alerts(self) -> dict[str, tuple[str, ...]]:
        """Kinds with an active episode, per device (for the demo and health output)."""
        return {d: det.active for d, det in self.detectors.items() if det.active}
