"""Vectorised ECG + PPG synthesis for many patients at once, beat by beat, with beat-level ground truth.

How a chunk is made, for all devices together:

1. Beats are scheduled ahead of the render window. Each new beat's RR interval comes from the heart-rate
   process (baseline, respiratory sinus arrhythmia, 0.1 Hz oscillation, episodes, atrial fibrillation,
   premature ventricular beats with compensatory pauses). Its true SBP/DBP come from the pressure process
   (baseline, circadian slice, slow drift, Mayer waves, respiration, episodes, beat effects), softly limited
   to the scenario's range.
2. Pulse arrival time = pre-ejection period + pulse transit time. Transit time = path length / pulse wave
   velocity, and the velocity follows Moens-Korteweg with Hughes' exponential elasticity,
   ``PWV = PWV_ref * exp(gamma * (P - P_ref) / 2)``, so it rises with pressure and stiffness and the
   arrival time shortens as pressure rises. The PEP shortens with sympathetic drive and lengthens a little
   with diastolic pressure, so the net relation differs from patient to patient.
3. Samples are rendered from per-patient beat templates (P-QRS-T sums of Gaussians for ECG; a forward and a
   reflected pulse for PPG) tabulated at 1 kHz, gathered for the previous, current and next beat of every
   sample. The reflected wave arrives earlier and larger as pressure and age rise, which changes the PPG shape.
4. Respiration, baseline wander, powerline, muscle noise, AF f-waves and the fault episodes (motion, sensor off,
   dropout, saturation) are added, and every sample gets a label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bpstream.simulators.patients import P_REF, Profiles
from bpstream.simulators.scenarios import LABEL_CODES, LABEL_PRIORITY, LABELS, ScenarioSpec, Schedule

_F = ("r", "rr", "sbp", "dbp", "pat", "type", "ecg_amp", "ppg_amp", "refl_off", "refl_ratio", "rise_scale", "qt")
_I = {name: i for i, name in enumerate(_F)}
_PAD_R = 1e12
_TAB_HZ = 1000.0
_ECG_PRE = 0.30
_ECG_LEN = 1000  # -0.30 .. +0.70 s
_PPG_LEN = 1600  # 0 .. 1.6 s
_REFL_PEAK = 0.12  # s, peak of the reflected-wave template after its own start
_PRIO = np.zeros(len(LABELS), dtype=np.int16)
for _rank, _name in enumerate(LABEL_PRIORITY):
    _PRIO[LABEL_CODES[_name]] = _rank
_KIND = {name: LABEL_CODES[name] for name in LABELS}
BEAT_NORMAL, BEAT_PVC, BEAT_AF = 0, 1, 2
ECG_RAIL_MV = 5.0
PPG_RAIL = 5.0


@dataclass(slots=True)
class Block:
    """Signals of every device over ``[t0, t0 + n/fs)`` and the beats whose R peak falls inside it."""

    t0: float
    ecg: np.ndarray  # float32 [devices, samples], mV
    ppg: np.ndarray  # float32 [devices, samples]
    labels: np.ndarray  # int8 [devices, samples]
    beat_device: np.ndarray  # int64 [beats]
    beat_time: np.ndarray  # float64 [beats], seconds from record start
    beat_sbp: np.ndarray
    beat_dbp: np.ndarray
    beat_pat: np.ndarray
    beat_type: np.ndarray


def _gauss(x: np.ndarray, mu: np.ndarray | float, sd: np.ndarray | float, amp: np.ndarray | float) -> np.ndarray:
    out: np.ndarray = amp * np.exp(-0.5 * ((x - mu) / sd) ** 2)
    return out


def _col(a: np.ndarray) -> np.ndarray:
    """A per-device vector as a column, to broadcast against ``[devices, samples]``."""
    return a[:, None]


def _ecg_tables(p: Profiles) -> np.ndarray:
    """ECG beat templates ``[n, 3, L]`` (normal, PVC, AF-conducted) in mV, R amplitude 1 (scaled per beat)."""
    tau = (np.arange(_ECG_LEN) / _TAB_HZ - _ECG_PRE)[None, :]
    c = _col
    qrs = c(p.ecg_qrs)
    qrs_t = (_gauss(tau, -2.2 * qrs, 0.8 * qrs, -0.12) + _gauss(tau, 0.0, qrs, 1.0)
             + _gauss(tau, 2.4 * qrs, qrs, -0.22) + _gauss(tau, 0.26, 0.045, c(p.ecg_t)))
    normal = qrs_t + _gauss(tau, -c(p.ecg_pr), 0.022, c(p.ecg_p))
    pvc = (_gauss(tau, 0.0, 3.2 * qrs, 1.35) + _gauss(tau, 0.075, 3.0 * qrs, -0.55)
           + _gauss(tau, 0.33, 0.06, -0.8 * c(p.ecg_t)))
    return np.stack([normal, pvc, qrs_t], axis=1)


def _gamma_pulse(tau: np.ndarray, peak: np.ndarray | float, k: float) -> np.ndarray:
    x = np.maximum(tau, 0) / peak
    out: np.ndarray = x**k * np.exp(k * (1 - x))
    return out


def _ppg_tables(p: Profiles) -> np.ndarray:
    """PPG templates ``[n, 2, L]``: forward pulse with diastolic run-off, and the reflected wave."""
    tau = (np.arange(_PPG_LEN) / _TAB_HZ)[None, :]
    rise = p.rise_s[:, None]
    runoff = (1 - np.exp(-tau / 0.06)) * np.exp(-tau / 0.25)
    forward = _gamma_pulse(tau, rise, 3.5) + 0.2 * runoff
    reflected = _gamma_pulse(tau, _REFL_PEAK, 2.5) * np.ones_like(rise)
    return np.stack([forward, reflected], axis=1)


def _soft_limit(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, knee: float = 10.0) -> np.ndarray:
    """Identity in the middle, smooth saturation within ``knee`` of each limit (monotonic)."""
    top, bottom = hi - knee, lo + knee
    x = np.where(x > top, top + knee * np.tanh((x - top) / knee), x)
    return np.where(x < bottom, bottom - knee * np.tanh((bottom - x) / knee), x)


class SignalEngine:
    """Generates consecutive blocks of ECG, PPG, labels and beat truth for a cohort of devices."""

    def __init__(self, profiles: Profiles, schedule: Schedule, specs: list[ScenarioSpec], rng: np.random.Generator,
                 sample_rate: float = 125.0) -> None:
        self.p = profiles
        self.s = schedule
        self.rng = rng
        self.fs = float(sample_rate)
        n = profiles.n
        self.n = n
        self.t = 0.0
        self._pvc_prob = np.array([s.pvc_prob for s in specs])
        self._sbp_lim = np.array([s.sbp_limits for s in specs]).T
        self._dbp_lim = np.array([s.dbp_limits for s in specs]).T
        self._noisy = np.array([s.noisy for s in specs])
        self._ecg_tab = _ecg_tables(profiles).astype(np.float32).ravel()
        self._ppg_tab = _ppg_tables(profiles).astype(np.float32).ravel()
        self._cap = 32
        self._b = np.zeros((len(_F), n, self._cap))
        self._b[_I["r"]] = _PAD_R
        self._count = np.zeros(n, dtype=np.int64)
        rr0 = 60.0 / profiles.hr0
        self._last_r = -3.0 - rng.uniform(0, 1, n) * rr0
        self._last_type = np.zeros(n, dtype=np.int64)
        self._rows = np.arange(n)
        self._pressure_kind = np.isin(schedule.kind, [_KIND[k] for k in ("activity", "stress", "crisis",
                                                                          "hypotension")])
        self._crisis_kind = schedule.kind == _KIND["crisis"]

    # ---- processes evaluated at beat times -------------------------------------------------------
    def _env(self, idx: np.ndarray, t: np.ndarray) -> np.ndarray:
        s = self.s
        tt = t[:, None]
        ramp = s.ramp[idx]
        env: np.ndarray = np.clip((tt - s.start[idx]) / ramp, 0, 1) * np.clip((s.end[idx] - tt) / ramp, 0, 1) * (
            s.kind[idx] >= 0)
        return env

    def _state(self, idx: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
        """Smooth SBP, DBP, HR and sympathetic drive of devices ``idx`` at times ``t``."""
        p, s = self.p, self.s
        env = self._env(idx, t)
        penv = env * self._pressure_kind[idx]
        ph = p.phase[idx]
        two_pi = 2 * np.pi
        calm = 1 - 0.6 * (env * self._crisis_kind[idx]).max(axis=1)  # crises are sustained, less variable
        circ = p.circ_sbp[idx] * np.cos(two_pi * (p.start_hour[idx] + t / 3600 - 15) / 24)
        drift = p.drift_amp[idx] * (np.sin(two_pi * p.drift_hz1[idx] * t + ph[:, 0])
                                    + 0.7 * np.sin(two_pi * p.drift_hz2[idx] * t + ph[:, 1]))
        mayer = p.mayer_amp[idx] * np.sin(two_pi * 0.1 * t + ph[:, 2])
        resp_phase = two_pi * p.resp_hz[idx] * t + ph[:, 3]
        resp = p.resp_bp_amp[idx] * np.sin(resp_phase)
        sbp = p.sbp0[idx] + (penv * s.dsbp[idx]).sum(1) + calm * (circ + drift + mayer + resp)
        dbp = p.dbp0[idx] + (penv * s.ddbp[idx]).sum(1) + calm * (0.6 * circ + 0.6 * drift + 0.5 * mayer
                                                                  + 0.3 * resp)
        hr = (p.hr0[idx] + (env * s.dhr[idx]).sum(1) + p.rsa_bpm[idx] * np.sin(resp_phase + 0.5)
              + p.lf_bpm[idx] * np.sin(two_pi * 0.1 * t + ph[:, 4]) + 0.3 * circ)
        symp = (penv * s.symp[idx]).max(axis=1)
        af = ((env > 0.5) & (s.kind[idx] == _KIND["atrial_fibrillation"])).any(axis=1)
        return sbp, dbp, np.clip(hr, 35, 190), symp, af, resp_phase

    def _extend(self, until: float) -> None:
        """Schedule beats until every device has one at or after ``until``."""
        p, rng = self.p, self.rng
        while True:
            idx = np.flatnonzero(self._last_r < until)
            if idx.size == 0:
                return
            m = idx.size
            t_prev = self._last_r[idx]
            _, _, hr, _, af, _ = self._state(idx, t_prev)
            rr_mean = 60.0 / hr
            z = rng.standard_normal(m)
            u = rng.random(m)
            prev_pvc = self._last_type[idx] == BEAT_PVC
            pvc = ~af & ~prev_pvc & (u < self._pvc_prob[idx])
            rr = rr_mean * (1 + 0.012 * z)
            rr = np.where(af, rr_mean * 0.92 * np.exp(0.2 * z), rr)
            rr = np.where(pvc, 0.62 * rr_mean, rr)
            rr = np.where(prev_pvc & ~af, 1.38 * rr_mean, rr)
            rr = np.clip(rr, 0.28, 2.2)
            r = t_prev + rr
            btype = np.where(af, BEAT_AF, np.where(pvc, BEAT_PVC, BEAT_NORMAL))
            sbp, dbp, _, symp, _, resp_phase = self._state(idx, r)
            rel = (rr - rr_mean) / rr_mean  # longer filling -> stronger beat (Frank-Starling)
            noise = rng.standard_normal((2, m))
            sbp = sbp + 14 * np.clip(rel, -0.5, 0.5) + 1.2 * noise[0]
            dbp = dbp + 4 * np.clip(rel, -0.5, 0.5) + 0.8 * noise[1]
            sbp = np.where(pvc, sbp - rng.uniform(15, 28, m), np.where(prev_pvc, sbp + 6, sbp))
            dbp = np.where(pvc, dbp - 3, dbp)
            sbp = _soft_limit(sbp, self._sbp_lim[0, idx], self._sbp_lim[1, idx])
            dbp = _soft_limit(dbp, self._dbp_lim[0, idx], self._dbp_lim[1, idx])
            dbp = np.minimum(dbp, sbp - 12)
            p_eff = dbp + p.p_weight[idx] * (sbp - dbp)
            pwv = p.pwv_ref[idx] * np.exp(p.gamma[idx] * (p_eff - P_REF) / 2)
            pep_wander = p.pep_drift_s[idx] * np.sin(2 * np.pi * r / 97.0 + p.phase[idx, 6])
            pep = (p.pep0[idx] + p.pep_dbp[idx] * (dbp - p.dbp0[idx]) - 0.025 * symp + pep_wander
                   + np.where(pvc, 0.04, 0.0))
            pat = pep + p.path_m[idx] / pwv + p.pat_jitter_s[idx] * rng.standard_normal(m)
            ratio = pwv / p.pwv_ref[idx]
            rise_scale = (1 + 0.2 * symp) * ratio**0.3
            refl_delay = p.refl_delay0[idx] / ratio
            values = np.empty((len(_F), m))
            values[_I["r"]] = r
            values[_I["rr"]] = rr
            values[_I["sbp"]] = sbp
            values[_I["dbp"]] = dbp
            values[_I["pat"]] = pat
            values[_I["type"]] = btype
            values[_I["ecg_amp"]] = p.ecg_amp[idx] * (1 + 0.07 * np.sin(resp_phase)) * np.where(af, 0.95, 1)
            values[_I["ppg_amp"]] = (p.ppg_amp[idx] * (sbp - dbp) / 45 * (1 - 0.3 * symp)
                                     * (1 + p.ppg_resp_mod[idx] * np.sin(resp_phase)) * np.where(pvc, 0.45, 1.0))
            values[_I["refl_off"]] = p.rise_s[idx] / rise_scale + refl_delay - _REFL_PEAK
            values[_I["refl_ratio"]] = np.clip(p.refl_ratio0[idx] + 0.003 * (sbp - 120), 0.05, 0.9)
            values[_I["rise_scale"]] = rise_scale
            values[_I["qt"]] = np.sqrt(0.8 / np.clip(rr, 0.3, 1.6))
            if int(self._count[idx].max()) >= self._cap:
                grow = np.zeros((len(_F), self.n, self._cap))
                grow[_I["r"]] = _PAD_R
                self._b = np.concatenate([self._b, grow], axis=2)
                self._cap *= 2
            self._b[:, idx, self._count[idx]] = values
            self._count[idx] += 1
            self._last_r[idx] = r
            self._last_type[idx] = btype

    # ---- rendering ---------------------------------------------------------------------------------
    def _last_before(self, times: np.ndarray, t0: float, n_samples: int) -> np.ndarray:
        """Per device and sample, the column of the last event (R peak or PPG foot) at or before the sample."""
        valid = np.arange(self._cap)[None, :] < self._count[:, None]
        first = np.ceil((np.where(valid, times, t0 + 1e6) - t0) * self.fs - 1e-9)
        first = np.clip(first, 0, n_samples).astype(np.int64)
        flat = (self._rows[:, None] * (n_samples + 1) + first)[valid]
        hist = np.bincount(flat, minlength=self.n * (n_samples + 1)).reshape(self.n, n_samples + 1)
        return np.cumsum(hist, axis=1)[:, :n_samples] - 1

    def _gather(self, field: str, cols: np.ndarray) -> np.ndarray:
        return np.take_along_axis(self._b[_I[field]], cols, axis=1)

    def step(self, seconds: float = 1.0) -> Block:
        """Render the next ``seconds`` of every device."""
        p = self.p
        n_samples = round(seconds * self.fs)
        t0 = self.t
        t1 = t0 + n_samples / self.fs
        self._extend(t1 + 1.0)
        t = t0 + np.arange(n_samples) / self.fs
        rows = self._rows[:, None]
        count = self._count[:, None]
        cap = self._cap
        r_all = self._b[_I["r"]]

        ecg = np.zeros((self.n, n_samples))
        j = self._last_before(r_all, t0, n_samples)
        jtype = np.zeros((self.n, n_samples))
        jtau = np.zeros((self.n, n_samples))
        for off in (-1, 0, 1):
            b = j + off
            ok = (b >= 0) & (b < count)
            bc = np.clip(b, 0, cap - 1)
            tau = t[None, :] - self._gather("r", bc)
            btype = self._gather("type", bc)
            if off == 0:
                jtype, jtau = np.where(ok, btype, -1), tau
            tau = np.where(tau > 0.06, 0.06 + (tau - 0.06) * self._gather("qt", bc), tau)
            ti = np.rint((tau + _ECG_PRE) * _TAB_HZ).astype(np.int64)
            ok &= (ti >= 0) & (ti < _ECG_LEN)
            fi = ((rows * 3 + btype.astype(np.int64)) * _ECG_LEN + np.clip(ti, 0, _ECG_LEN - 1))
            ecg += np.where(ok, self._ecg_tab[fi] * self._gather("ecg_amp", bc), 0.0)

        ppg = np.zeros((self.n, n_samples))
        feet = np.where(np.arange(cap)[None, :] < count, r_all + self._b[_I["pat"]], _PAD_R)
        jp = self._last_before(feet, t0, n_samples)
        for off in (0, -1, -2):
            b = jp + off
            ok = (b >= 0) & (b < count)
            bc = np.clip(b, 0, cap - 1)
            tau = t[None, :] - np.take_along_axis(feet, bc, axis=1)
            fi = np.rint(tau * self._gather("rise_scale", bc) * _TAB_HZ).astype(np.int64)
            ri = np.rint((tau - self._gather("refl_off", bc)) * _TAB_HZ).astype(np.int64)
            base = rows * 2 * _PPG_LEN
            fwd = np.where((fi >= 0) & (fi < _PPG_LEN), self._ppg_tab[base + np.clip(fi, 0, _PPG_LEN - 1)], 0.0)
            refl = np.where((ri >= 0) & (ri < _PPG_LEN),
                            self._ppg_tab[base + _PPG_LEN + np.clip(ri, 0, _PPG_LEN - 1)], 0.0)
            ppg += np.where(ok, self._gather("ppg_amp", bc) * (fwd + self._gather("refl_ratio", bc) * refl), 0.0)

        # ---- respiration, wander, powerline, noise --------------------------------------------------
        two_pi = 2 * np.pi
        ph = p.phase
        c = _col
        resp = np.sin(two_pi * c(p.resp_hz) * t + c(ph[:, 3]))
        slow = np.sin(two_pi * 0.23 * t + c(ph[:, 5])) + 0.6 * np.sin(two_pi * 0.07 * t + c(ph[:, 6]))
        noise = self.rng.standard_normal((2, self.n, n_samples))
        ecg += c(p.wander) * (resp + 0.6 * slow) + c(p.ecg_noise) * noise[0]
        ecg += c(p.powerline) * np.sin(two_pi * c(p.mains_hz) * t + c(ph[:, 7]))
        ppg += c(p.ppg_base) + c(p.ppg_amp) * (0.08 * resp + 0.5 * c(p.wander) * slow) + c(p.ppg_noise) * noise[1]

        # ---- episodes: labels, AF f-waves and faults ------------------------------------------------
        labels = np.zeros((self.n, n_samples), dtype=np.int16)
        labels[self._noisy] = _KIND["noisy"]
        ect = (jtype == BEAT_PVC) & (jtau < 0.5)
        labels = np.where(ect & (_PRIO[_KIND["ectopic"]] > _PRIO[labels]), _KIND["ectopic"], labels)
        s = self.s
        fault_masks: dict[int, np.ndarray] = {}
        for e in range(s.kind.shape[1]):
            kind = s.kind[:, e]
            if not (kind >= 0).any() or (s.end[:, e] < t0).all() or (s.start[:, e] >= t1).all():
                continue
            half = np.where(self._pressure_kind[:, e], s.ramp[:, e] / 2, 0.0)
            act = ((t[None, :] >= c(s.start[:, e] + half)) & (t[None, :] < c(s.end[:, e] - half))
                   & c(kind >= 0))
            if not act.any():
                continue
            k64 = kind.astype(np.int64)
            better = act & (_PRIO[np.clip(k64, 0, None)][:, None] > _PRIO[labels])
            labels = np.where(better, c(kind), labels)
            for code in np.unique(kind[act.any(axis=1)]):
                mask = act & c(kind == code)
                if code == _KIND["atrial_fibrillation"]:
                    ecg += np.where(mask, 0.05 * np.sin(two_pi * c(s.p1[:, e]) * t + 3 * np.sin(0.7 * t)), 0.0)
                elif code == _KIND["motion"]:
                    mo = (np.sin(two_pi * c(s.p1[:, e]) * t + c(s.p2[:, e]))
                          + 0.6 * np.sin(two_pi * 1.7 * c(s.p1[:, e]) * t + 2 * c(s.p2[:, e])))
                    ppg += np.where(mask, 1.5 * c(p.ppg_amp) * mo + 0.05 * noise[1], 0.0)
                    ecg += np.where(mask, 0.35 * mo + 0.08 * noise[0], 0.0)
                elif code in (_KIND["sensor_off"], _KIND["dropout"], _KIND["saturation"]):
                    prev = fault_masks.get(int(code))
                    fault_masks[int(code)] = mask if prev is None else (prev | mask)
        sat = fault_masks.get(_KIND["saturation"])
        if sat is not None:
            ecg = np.where(sat, ECG_RAIL_MV, ecg)
            ppg = np.where(sat, PPG_RAIL, ppg)
        lead_off = fault_masks.get(_KIND["sensor_off"])
        if lead_off is not None:
            ecg = np.where(lead_off, 0.002 * noise[0], ecg)
            ppg = np.where(lead_off, 0.01 + 0.001 * noise[1], ppg)
        drop = fault_masks.get(_KIND["dropout"])
        if drop is not None:
            ecg = np.where(drop, 0.0, ecg)
            ppg = np.where(drop, 0.0, ppg)
        np.clip(ecg, -ECG_RAIL_MV, ECG_RAIL_MV, out=ecg)
        np.clip(ppg, 0.0, PPG_RAIL, out=ppg)

        # ---- beat truth, then forget beats no longer needed -----------------------------------------
        r = r_all
        inside = (np.arange(cap)[None, :] < count) & (r >= t0) & (r < t1)
        dev, col = np.nonzero(inside)
        order = np.lexsort((r[dev, col], dev))
        dev, col = dev[order], col[order]
        block = Block(t0=t0, ecg=ecg.astype(np.float32), ppg=ppg.astype(np.float32), labels=labels.astype(np.int8),
                      beat_device=dev, beat_time=r[dev, col], beat_sbp=self._b[_I["sbp"], dev, col],
                      beat_dbp=self._b[_I["dbp"], dev, col], beat_pat=self._b[_I["pat"], dev, col],
                      beat_type=self._b[_I["type"], dev, col].astype(np.int8))
        self._forget(t1 - 3.0)
        self.t = t1
        return block

    def _forget(self, before: float) -> None:
        r = self._b[_I["r"]]
        valid = np.arange(self._cap)[None, :] < self._count[:, None]
        drop = ((r < before) & valid).sum(axis=1)
        if not drop.any():
            return
        cols = np.arange(self._cap)[None, :] + drop[:, None]
        inside = cols < self._cap
        cols = np.clip(cols, 0, self._cap - 1)
        self._b = np.take_along_axis(self._b, np.broadcast_to(cols, self._b.shape), axis=2)
        self._b[_I["r"]][~inside] = _PAD_R
        self._count -= drop
        self._b[_I["r"]][np.arange(self._cap)[None, :] >= self._count[:, None]] = _PAD_R
