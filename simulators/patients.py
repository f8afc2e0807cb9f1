"""Per-patient physiology drawn for a cohort: demographics, pressure baseline, heart rate, respiration, arterial
stiffness and the pulse-arrival-time mapping, ECG and PPG morphology, and sensor noise.

Everything is a NumPy array over patients (struct of arrays) so thousands of devices are generated at once.
The PAT-to-pressure mapping is per patient on purpose: path length (height), reference pulse wave velocity
(age, baseline pressure, individual stiffness), the Moens-Korteweg/Hughes elastic exponent ``gamma`` and the
pre-ejection period differ between people, so no single curve fits everyone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from bpstream.simulators.scenarios import scenario_spec

#: Reference effective pressure (mmHg) at which each patient's ``pwv_ref`` holds.
P_REF = 100.0


@dataclass(slots=True)
class Profiles:
    """Physiology of ``n`` patients, one array element per patient."""

    age: np.ndarray
    male: np.ndarray  # 1.0 male, 0.0 female
    height_m: np.ndarray
    sbp0: np.ndarray
    dbp0: np.ndarray
    hr0: np.ndarray
    rsa_bpm: np.ndarray  # respiratory sinus arrhythmia amplitude
    lf_bpm: np.ndarray  # 0.1 Hz heart-rate oscillation amplitude
    resp_hz: np.ndarray
    start_hour: np.ndarray  # clock time at record start (circadian slice)
    circ_sbp: np.ndarray  # circadian amplitude
    drift_amp: np.ndarray
    drift_hz1: np.ndarray
    drift_hz2: np.ndarray
    mayer_amp: np.ndarray
    resp_bp_amp: np.ndarray
    path_m: np.ndarray  # heart-to-finger pulse path length
    pwv_ref: np.ndarray  # pulse wave velocity (m/s) at P_REF
    gamma: np.ndarray  # elastic exponent (1/mmHg): PWV ~ exp(gamma * P / 2)
    p_weight: np.ndarray  # effective pressure = DBP + w * (SBP - DBP)
    pep0: np.ndarray  # pre-ejection period at rest (s)
    pep_dbp: np.ndarray  # PEP rise per mmHg of DBP (isovolumic contraction must reach aortic DBP)
    pep_drift_s: np.ndarray  # slow PEP wander unrelated to pressure (contractility, posture)
    pat_jitter_s: np.ndarray  # beat-to-beat PAT noise SD
    ecg_amp: np.ndarray  # R amplitude, mV
    ecg_p: np.ndarray
    ecg_t: np.ndarray
    ecg_pr: np.ndarray
    ecg_qrs: np.ndarray
    ppg_amp: np.ndarray
    ppg_base: np.ndarray
    ppg_resp_mod: np.ndarray  # respiratory modulation of pulse amplitude (fraction)
    rise_s: np.ndarray  # PPG foot-to-peak time
    refl_delay0: np.ndarray  # reflected-wave delay after the systolic peak at P_REF
    refl_ratio0: np.ndarray  # reflection (augmentation) ratio at 120 mmHg
    ecg_noise: np.ndarray  # white (muscle) noise SD, mV
    ppg_noise: np.ndarray
    wander: np.ndarray  # baseline wander amplitude (mV; PPG scaled)
    powerline: np.ndarray  # powerline amplitude, mV
    mains_hz: np.ndarray  # 50 or 60
    phase: np.ndarray  # random phases for the sinusoidal processes, shape [n, 8]

    @property
    def n(self) -> int:
        return int(self.age.shape[0])

    def as_dict(self, i: int, scenario: str) -> dict[str, float | str]:
        """The profile of patient ``i`` as plain values (stored with datasets)."""
        out: dict[str, float | str] = {"scenario": scenario, "sex": "M" if self.male[i] > 0.5 else "F"}
        for f in fields(self):
            if f.name in ("male", "phase"):
                continue
            out[f.name] = round(float(getattr(self, f.name)[i]), 6)
        out["stiffness_pwv_ref"] = out["pwv_ref"]
        out["pat_ref_s"] = round(float(self.pep0[i] + self.path_m[i] / self.pwv_ref[i]), 6)
        return out


def draw_profiles(names: Sequence[str], rng: np.random.Generator) -> Profiles:
    """Draw one patient per scenario name (the scenario fixes the baseline pressure category)."""
    n = len(names)
    specs = [scenario_spec(s) for s in names]
    u = rng.uniform
    age = u(25, 82, n)
    male = (rng.random(n) < 0.5).astype(float)
    height = np.where(male > 0, rng.normal(1.76, 0.07, n), rng.normal(1.63, 0.065, n)).clip(1.45, 2.0)
    lo_s = np.array([s.baseline_sbp[0] for s in specs])
    hi_s = np.array([s.baseline_sbp[1] for s in specs])
    lo_d = np.array([s.baseline_dbp[0] for s in specs])
    hi_d = np.array([s.baseline_dbp[1] for s in specs])
    sbp0 = lo_s + (hi_s - lo_s) * rng.random(n)
    dbp0 = np.minimum(lo_d + (hi_d - lo_d) * rng.random(n), sbp0 - 28)
    hr0 = rng.normal(69, 9, n).clip(50, 98)
    youth = ((80 - age) / 55).clip(0.1, 1)
    # Stiffer arteries with age and pressure (PWV rises ~0.1 m/s per year of age after 25 and with SBP).
    pwv_ref = (4.6 + 0.055 * (age - 25) + 0.03 * (sbp0 - 120) + rng.normal(0, 0.6, n)).clip(4.0, 12.0)
    noisy = np.array([s.noise_scale for s in specs])
    return Profiles(
        age=age, male=male, height_m=height, sbp0=sbp0, dbp0=dbp0, hr0=hr0,
        rsa_bpm=(u(2, 7, n) * youth), lf_bpm=u(1, 3, n), resp_hz=u(10, 20, n) / 60,
        start_hour=u(0, 24, n), circ_sbp=u(2, 6, n), drift_amp=u(1.5, 4, n),
        drift_hz1=1 / u(150, 600, n), drift_hz2=1 / u(400, 1200, n), mayer_amp=u(1, 3, n),
        resp_bp_amp=u(1, 3, n),
        path_m=height * u(0.5, 0.6, n), pwv_ref=pwv_ref, gamma=u(0.012, 0.03, n), p_weight=u(0.2, 0.6, n),
        pep0=u(0.07, 0.12, n), pep_dbp=u(0.0, 0.0006, n), pep_drift_s=u(0.002, 0.008, n),
        pat_jitter_s=u(0.002, 0.006, n),
        ecg_amp=rng.lognormal(np.log(0.8), 0.4, n).clip(0.3, 2.2), ecg_p=u(0.08, 0.16, n),
        ecg_t=u(0.18, 0.38, n), ecg_pr=u(0.14, 0.19, n), ecg_qrs=u(0.009, 0.013, n),
        ppg_amp=rng.lognormal(np.log(0.9), 0.4, n).clip(0.2, 3.0), ppg_base=u(0.3, 1.5, n),
        ppg_resp_mod=rng.lognormal(np.log(0.1), 0.6, n).clip(0.02, 0.35),
        rise_s=(0.13 + 0.0013 * (age - 25) + rng.normal(0, 0.015, n)).clip(0.07, 0.26),
        refl_delay0=(0.26 - 0.0016 * (age - 25) + rng.normal(0, 0.02, n)).clip(0.1, 0.34),
        refl_ratio0=(0.2 + 0.006 * (age - 25) + rng.normal(0, 0.05, n)).clip(0.1, 0.7),
        ecg_noise=u(0.005, 0.022, n) * noisy, ppg_noise=u(0.002, 0.008, n) * noisy,
        wander=u(0.008, 0.045, n) * noisy,
        powerline=np.where(noisy > 1, u(0.03, 0.1, n), u(0, 0.004, n)),
        mains_hz=np.where(rng.random(n) < 0.5, 50.0, 60.0),
        phase=u(0, 2 * np.pi, (n, 8)),
    )
