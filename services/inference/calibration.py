"""Per-device cuff calibration, 90% intervals and withheld estimates: inference's pure calibration stage.

The formula is the shared one (``bpstream.shared.model.calibration``)::

    calibrated = cuff + gain * (model(now) - reference)

where ``reference`` is the model's mean calibration-free output over the device's windows that end within
``reference_window_s`` of the cuff time. :class:`CalibrationBook` keeps, per ``clinic/device``:

* the latest cuff reading (from the compacted ``cuff`` topic: read whole at start, then followed);
* the newest *finished* calibration (:class:`CalibrationRecord`, persisted to ``calibration.state`` so a
  restart does not need the windows around an old cuff reading again);
* the model's recent raw outputs (``buffer_s`` of window time, per model version), from which a new reading's
  reference is computed once the windows up to ``cuff time + reference_window_s`` have been scored (or at once
  when the reading arrives later than those windows).

A new reading replaces the old calibration as soon as its reference is known; until then the previous
calibration stays in use. A calibration is only valid for the model version it was computed with: after a
model swap the device is recalibrated from the buffered outputs of the new model if the cuff time is still
covered, else it is uncalibrated until the next cuff reading.

Every estimate leaves with its ``mode``, the calibration's cuff time, id and age, a 90% interval
(``max(conformal half-width of the mode, z * model SD)``) and ``withheld``:

``signal_quality``        the window was too poor to score (no pressures);
``out_of_distribution``   an input feature (e.g. heart rate) lies outside the model's ``input_ranges``;
``calibration_stale``     the calibration is older than ``max_age_s`` (a "calibration due" alert follows);
``interval_too_wide``     a calibrated estimate's SBP half-width exceeds ``max_half_width_sbp``.

Uncalibrated estimates are not withheld for their (wide) interval: they are shown as a category with the
interval, and only a crisis may be raised on them (asking for a cuff reading). Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from bpstream.shared.messages import CalibrationRecord, CuffReading, Estimate
from bpstream.shared.model.calibration import CALIBRATED, UNCALIBRATED, Calibration, IntervalSpec, calibrated_pressure
from bpstream.shared.topics import cuff_key

SIGNAL_QUALITY: Final = "signal_quality"
OUT_OF_DISTRIBUTION: Final = "out_of_distribution"
CALIBRATION_STALE: Final = "calibration_stale"
INTERVAL_TOO_WIDE: Final = "interval_too_wide"
#: Two-sided 90% normal quantile: the model's own SD as a 90% half-width.
Z90: Final = 1.6448536


@dataclass(slots=True, frozen=True)
class CalibrationPolicy:
    """Settings of the calibration stage (from ``InferenceSettings`` and the model's metadata)."""

    reference_window_s: float = 60.0
    max_age_s: float = 24 * 3600.0
    max_half_width_sbp: float = 25.0
    buffer_s: float = 600.0
    spec: IntervalSpec = field(default_factory=IntervalSpec)
    input_ranges: Mapping[str, Sequence[float]] = field(default_factory=dict)


@dataclass(slots=True)
class _Device:
    raw: deque[tuple[int, float, float, str]] = field(default_factory=deque)
    cuff: CuffReading | None = None
    record: CalibrationRecord | None = None
    #: (cuff time, cuff id, model version) whose reference could not be formed (no windows around it).
    failed: tuple[int, str, str] | None = None


def _same_cuff(record: CalibrationRecord, cuff: CuffReading) -> bool:
    return record.time_ns == cuff.time_ns and record.cuff_id == cuff.cuff_id


class CalibrationBook:
    """Calibration state of every device this inference instance scores."""

    def __init__(self, policy: CalibrationPolicy | None = None) -> None:
        self.policy = policy or CalibrationPolicy()
        self.devices: dict[str, _Device] = {}

    def _device(self, key: str) -> _Device:
        device = self.devices.get(key)
        if device is None:
            device = self.devices[key] = _Device()
        return device

    # ---- state in -------------------------------------------------------------------------------------------
    def add_cuff(self, reading: CuffReading) -> None:
        """A cuff reading (from the ``cuff`` topic, in order): the device's newest one wins."""
        device = self._device(cuff_key(reading.clinic_id, reading.device_id))
        if device.cuff is not None and reading.time_ns < device.cuff.time_ns:
            return  # an older reading arriving late does not replace a newer one
        device.cuff = reading

    def restore(self, records: Iterable[CalibrationRecord]) -> None:
        """Finished calibrations saved before a restart (``calibration.state``)."""
        for record in records:
            device = self._device(cuff_key(record.clinic_id, record.device_id))
            if device.record is None or record.time_ns >= device.record.time_ns:
                device.record = record

    def calibration(self, clinic_id: str, device_id: str) -> CalibrationRecord | None:
        device = self.devices.get(cuff_key(clinic_id, device_id))
        return None if device is None else device.record

    # ---- the stage ----------------------------------------------------------------------------------------
    def process(self, estimates: Sequence[Estimate],
                features: Mapping[tuple[str, str, int], Mapping[str, float | None]] | None = None,
                ) -> tuple[list[Estimate], list[CalibrationRecord]]:
        """Calibrate a batch of the model's estimates (window order per device).

        ``features`` maps ``(clinic_id, device_id, window_end_ns)`` to the window's input features (e.g.
        ``heart_rate_bpm``) for the out-of-distribution check. Returns the annotated estimates and the
        calibrations finished by this batch (to persist).
        """
        features = features or {}
        finished: list[CalibrationRecord] = []
        out: list[Estimate] = []
        for estimate in estimates:
            device = self._device(cuff_key(estimate.clinic_id, estimate.device_id))
            if estimate.quality_ok:
                self._remember(device, estimate)
            record = self._maybe_finish(device, estimate)
            if record is not None:
                finished.append(record)
            out.append(self._annotate(device, estimate, features.get((estimate.clinic_id, estimate.device_id,
                                                                     estimate.window_end_ns), {})))
        return out, finished

    def pending_finish(self) -> list[CalibrationRecord]:
        """Readings whose windows are already buffered (a cuff reading sent after the fact): finish them now."""
        finished: list[CalibrationRecord] = []
        for device in self.devices.values():
            if device.raw:
                end_ns, _, _, version = device.raw[-1]
                record = self._try_finish(device, end_ns, version)
                if record is not None:
                    finished.append(record)
        return finished

    def _remember(self, device: _Device, estimate: Estimate) -> None:
        raw = device.raw
        if raw and estimate.window_end_ns <= raw[-1][0]:
            return  # a replayed window: its output is already buffered
        raw.append((estimate.window_end_ns, float(estimate.sbp), float(estimate.dbp), estimate.model_version))
        horizon = estimate.window_end_ns - round(self.policy.buffer_s * 1e9)
        while raw and raw[0][0] < horizon:
            raw.popleft()

    def _maybe_finish(self, device: _Device, estimate: Estimate) -> CalibrationRecord | None:
        return self._try_finish(device, estimate.window_end_ns, estimate.model_version)

    def _try_finish(self, device: _Device, now_ns: int, model_version: str) -> CalibrationRecord | None:
        cuff = device.cuff
        if cuff is None:
            return None
        record = device.record
        if record is not None and _same_cuff(record, cuff) and record.model_version == model_version:
            return None
        if device.failed == (cuff.time_ns, cuff.cuff_id, model_version):
            return None
        half = round(self.policy.reference_window_s * 1e9)
        if now_ns < cuff.time_ns + half:
            return None  # windows up to cuff + reference window are still to come
        around = [(s, d) for end, s, d, version in device.raw
                  if version == model_version and abs(end - cuff.time_ns) <= half]
        if not around:
            device.failed = (cuff.time_ns, cuff.cuff_id, model_version)
            return None
        finished = CalibrationRecord(
            clinic_id=cuff.clinic_id, device_id=cuff.device_id, cuff_sbp=cuff.sbp, cuff_dbp=cuff.dbp,
            time_ns=cuff.time_ns, cuff_id=cuff.cuff_id,
            reference_sbp=round(math.fsum(s for s, _ in around) / len(around), 3),
            reference_dbp=round(math.fsum(d for _, d in around) / len(around), 3),
            n_windows=len(around), model_version=model_version)
        device.record = finished
        return finished

    def _annotate(self, device: _Device, estimate: Estimate, features: Mapping[str, float | None]) -> Estimate:
        policy, spec = self.policy, self.policy.spec
        record = device.record
        if record is not None and record.model_version != estimate.model_version:
            record = None  # computed with another model: its reference means nothing to this one
        mode = CALIBRATED if record is not None else UNCALIBRATED
        age_s = None if record is None else round((estimate.window_end_ns - record.time_ns) / 1e9, 1)
        common = {"mode": mode, "calibration_ns": None if record is None else record.time_ns,
                  "calibration_cuff_id": None if record is None else record.cuff_id,
                  "calibration_age_s": age_s}
        if not estimate.quality_ok:
            return msgspec.structs.replace(estimate, withheld=SIGNAL_QUALITY, **common)
        raw_sbp, raw_dbp = float(estimate.sbp), float(estimate.dbp)
        if record is not None:
            cal = Calibration(record.cuff_sbp, record.cuff_dbp, record.reference_sbp, record.reference_dbp)
            sbp, dbp = calibrated_pressure(raw_sbp, raw_dbp, cal, gain_sbp=spec.gain_sbp, gain_dbp=spec.gain_dbp)
        else:
            sbp, dbp = raw_sbp, raw_dbp
        hw_sbp, hw_dbp = spec.half_widths(mode)
        if mode == UNCALIBRATED:
            # The model's own SD is about its absolute error, so it may widen the calibration-free interval.
            # A calibrated estimate's error is the error of a change from the cuff: its split-conformal
            # half-width (validated on held-out records, docs/MODEL_CARD.md) is the whole interval.
            hw_sbp = max(hw_sbp, Z90 * float(estimate.sbp_sd))
            hw_dbp = max(hw_dbp, Z90 * float(estimate.dbp_sd))
        withheld: str | None = None
        if self._out_of_distribution(features):
            withheld = OUT_OF_DISTRIBUTION
        elif age_s is not None and age_s > policy.max_age_s:
            withheld = CALIBRATION_STALE
        elif mode == CALIBRATED and hw_sbp > policy.max_half_width_sbp:
            withheld = INTERVAL_TOO_WIDE
        return msgspec.structs.replace(
            estimate, sbp=round(sbp, 2), dbp=round(dbp, 2), raw_sbp=round(raw_sbp, 2), raw_dbp=round(raw_dbp, 2),
            sbp_lo=round(sbp - hw_sbp, 2), sbp_hi=round(sbp + hw_sbp, 2), dbp_lo=round(dbp - hw_dbp, 2),
            dbp_hi=round(dbp + hw_dbp, 2), withheld=withheld, **common)

    def _out_of_distribution(self, features: Mapping[str, float | None]) -> bool:
        for name, bounds in self.policy.input_ranges.items():
            value = features.get(name)
            if value is None or len(bounds) != 2 or not math.isfinite(value):
                continue  # no such feature on this window, or no usable range: no check
            if not bounds[0] <= value <= bounds[1]:
                return True
        return False
