"""Cuff calibration and prediction intervals: the one formula that evaluation and the live system share.

A cuffless monitor is enrolled with a cuff reading and then tracks change from it. With a calibration made of
the cuff reading and the model's own output on the windows around the cuff time (``reference``)::

    calibrated = cuff + gain * (model(now) - reference)

``gain`` (0..1, fitted on held-out training records, in the model's metadata) shrinks the model's change towards
the carried-forward cuff when the model's changes are noisy: ``gain = 0`` is the cuff carried forward.

Each estimate carries a two-sided interval ``value +/- half_width`` at the artefact's nominal coverage (90%),
with half-widths per mode from split conformal prediction over held-out records (:class:`IntervalSpec`).

>>> cal = Calibration(cuff_sbp=130.0, cuff_dbp=80.0, reference_sbp=120.0, reference_dbp=75.0)
>>> calibrated_pressure(126.0, 77.0, cal, gain_sbp=0.5, gain_dbp=1.0)
(133.0, 82.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

#: Default nominal coverage of the intervals.
NOMINAL_COVERAGE: Final = 0.9
CALIBRATED: Final = "calibrated"
UNCALIBRATED: Final = "uncalibrated"


@dataclass(slots=True, frozen=True)
class Calibration:
    """A cuff reading and the model's output (mmHg) on the windows around the cuff time."""

    cuff_sbp: float
    cuff_dbp: float
    reference_sbp: float
    reference_dbp: float


def calibrated_pressure(sbp: float, dbp: float, cal: Calibration, *, gain_sbp: float = 1.0,
                        gain_dbp: float = 1.0) -> tuple[float, float]:
    """The calibrated estimate of one window from the model's calibration-free output (mmHg)."""
    return (cal.cuff_sbp + gain_sbp * (sbp - cal.reference_sbp),
            cal.cuff_dbp + gain_dbp * (dbp - cal.reference_dbp))


def calibrated_array(raw: npt.NDArray[np.floating[Any]], cuff: npt.NDArray[np.floating[Any]],
                     reference: npt.NDArray[np.floating[Any]], gain: float | npt.NDArray[np.floating[Any]] = 1.0,
                     ) -> npt.NDArray[np.float64]:
    """Vectorised :func:`calibrated_pressure`: arrays broadcast against each other (e.g. ``(N, 2)``)."""
    return np.asarray(cuff, dtype=np.float64) + np.asarray(gain) * (
        np.asarray(raw, dtype=np.float64) - np.asarray(reference, dtype=np.float64))


@dataclass(slots=True, frozen=True)
class IntervalSpec:
    """Half-widths (mmHg) of the ``nominal`` intervals, per mode, and the calibration gains."""

    nominal: float = NOMINAL_COVERAGE
    calibrated_sbp: float = 15.0
    calibrated_dbp: float = 9.0
    uncalibrated_sbp: float = 35.0
    uncalibrated_dbp: float = 20.0
    gain_sbp: float = 1.0
    gain_dbp: float = 1.0

    def half_widths(self, mode: str) -> tuple[float, float]:
        """(SBP, DBP) half-widths for ``mode`` ("calibrated" or "uncalibrated")."""
        if mode == CALIBRATED:
            return self.calibrated_sbp, self.calibrated_dbp
        return self.uncalibrated_sbp, self.uncalibrated_dbp

    def to_dict(self) -> dict[str, Any]:
        return {"nominal": self.nominal,
                CALIBRATED: {"sbp": self.calibrated_sbp, "dbp": self.calibrated_dbp},
                UNCALIBRATED: {"sbp": self.uncalibrated_sbp, "dbp": self.uncalibrated_dbp},
                "gain": {"sbp": self.gain_sbp, "dbp": self.gain_dbp}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> IntervalSpec:
        """Read the ``intervals`` entry of a model's metadata; the defaults where it says nothing."""
        if not d:
            return cls()
        default = cls()
        cal = d.get(CALIBRATED, {})
        unc = d.get(UNCALIBRATED, {})
        gain = d.get("gain", {})
        return cls(nominal=float(d.get("nominal", default.nominal)),
                   calibrated_sbp=float(cal.get("sbp", default.calibrated_sbp)),
                   calibrated_dbp=float(cal.get("dbp", default.calibrated_dbp)),
                   uncalibrated_sbp=float(unc.get("sbp", default.uncalibrated_sbp)),
                   uncalibrated_dbp=float(unc.get("dbp", default.uncalibrated_dbp)),
                   gain_sbp=float(gain.get("sbp", default.gain_sbp)),
                   gain_dbp=float(gain.get("dbp", default.gain_dbp)))


def conformal_half_width(abs_residuals: npt.NDArray[np.floating[Any]], nominal: float = NOMINAL_COVERAGE) -> float:
    """Split-conformal half-width: the ``ceil((n+1) * nominal)``-th smallest absolute residual."""
    r = np.sort(np.asarray(abs_residuals, dtype=np.float64).ravel())
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan")
    k = min(int(np.ceil((r.size + 1) * nominal)), r.size)
    return float(r[k - 1])
