"""How often the shared SQI flags simulated windows the simulator labels as corrupted, and clean ones.

A mixed cohort is simulated, cut into 8 s windows every 2 s (the stream's grid), and every window is prepared
with ``bpstream.shared.preprocessing.preprocess_windows``. A window counts as *faulty* when more than 10% of its
samples carry a fault label (motion, sensor off, dropout, saturation), as in the model evaluation. The same
windows are also prepared without the ECG/PPG heart-rate agreement check, for comparison in one process.

Run: ``.venv/bin/python -m bpstream.simulators.sqi_check --devices 40 --seconds 300 --seed 1000``
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bpstream.shared.preprocessing import MAX_HR_DISAGREEMENT, preprocess_windows
from bpstream.simulators.cohort import build_cohort
from bpstream.simulators.scenarios import FAULT_KINDS, LABEL_CODES


def flag_rates(devices: int, seconds: int, seed: int, scenario: str = "mixed") -> dict[str, float | int]:
    engine = build_cohort(scenario, devices, seed, seconds + 5.0).engine
    blocks = [engine.step(1.0) for _ in range(seconds)]
    ecg = np.concatenate([b.ecg for b in blocks], axis=1)
    ppg = np.concatenate([b.ppg for b in blocks], axis=1)
    labels = np.concatenate([b.labels for b in blocks], axis=1)
    fault_codes = [LABEL_CODES[k] for k in FAULT_KINDS]
    windows: list[tuple[np.ndarray, tuple[str, ...], float]] = []
    faulty: list[bool] = []
    for d in range(devices):
        for start in range(0, ecg.shape[1] - 1000 + 1, 250):
            windows.append((np.stack([ecg[d, start:start + 1000], ppg[d, start:start + 1000]]), ("ecg", "ppg"), 125.0))
            faulty.append(bool(np.isin(labels[d, start:start + 1000], fault_codes).mean() > 0.1))
    fault = np.array(faulty)

    def flagged(max_hr_disagreement: float) -> np.ndarray:
        results = preprocess_windows(windows, max_hr_disagreement=max_hr_disagreement)
        return np.array([not getattr(r, "quality_ok", False) for r in results])

    now = flagged(MAX_HR_DISAGREEMENT)
    without = flagged(float("inf"))
    return {"windows": len(windows), "fault_windows": int(fault.sum()),
            "flagged_given_fault": round(float(now[fault].mean()), 3),
            "flagged_given_clean": round(float(now[~fault].mean()), 4),
            "without_hr_check_flagged_given_fault": round(float(without[fault].mean()), 3),
            "without_hr_check_flagged_given_clean": round(float(without[~fault].mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--scenario", default="mixed")
    args = parser.parse_args()
    print(json.dumps(flag_rates(args.devices, args.seconds, args.seed, args.scenario)))


if __name__ == "__main__":
    main()
