"""Subject-independent splits, windowing of simulated records, and that training actually learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bpstream.shared.model.network import BpNet, NetworkConfig
from bpstream.simulators.dataset import simulate_cohort
from bpstream.training.data import anomaly_label, windows_from_sim
from bpstream.training.splits import SubjectLeakError, assert_disjoint, group_kfold, split_subjects
from bpstream.training.train import TrainConfig, _subject_partners, predict_net, train_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_windows():  # type: ignore[no-untyped-def]
    ds = simulate_cohort(6, 1.5, seed=11)
    return windows_from_sim(ds.records, hop_s=4.0, label_names=ds.label_names)


@pytest.mark.parametrize("k", [2, 3, 5, 100])
def test_group_kfold_never_puts_a_subject_on_both_sides(k: int) -> None:
    subject = np.repeat([f"s{i}" for i in range(7)], np.arange(1, 8))
    seen_test: list[str] = []
    for train, test in group_kfold(subject, k, seed=3):
        assert set(subject[train]).isdisjoint(subject[test])
        assert len(train) + len(test) == len(subject)
        seen_test += sorted(set(subject[test]))
    assert sorted(seen_test) == sorted(set(subject))  # every subject tested exactly once


def test_split_subjects_is_disjoint_and_leaks_are_caught() -> None:
    subject = np.repeat([f"s{i}" for i in range(20)], 5)
    train, held = split_subjects(subject, 0.2, seed=0)
    assert set(subject[train]).isdisjoint(subject[held])
    assert len(set(subject[held])) == 4
    with pytest.raises(SubjectLeakError):
        assert_disjoint(["a", "b"], ["c", "b"])


def test_windows_are_labelled_by_the_beats_inside_them(tiny_windows) -> None:  # type: ignore[no-untyped-def]
    ws = tiny_windows
    ds = simulate_cohort(6, 1.5, seed=11)
    rec = ds.records[0]
    i = int(np.flatnonzero(ws.subject == rec.subject_id)[2])
    s, d = rec.truth_between(ws.t_start[i], ws.t_start[i] + 8.0)
    assert ws.sbp[i] == pytest.approx(s, abs=1e-3) and ws.dbp[i] == pytest.approx(d, abs=1e-3)
    assert ws.x.shape[1:] == (2, 1000) and ws.x.dtype == np.float32
    assert len(ws.subjects) == 6
    np.testing.assert_array_equal(anomaly_label(np.array([150.0, 120, 85]), np.array([80.0, 95, 60])), [1, 1, 1])
    np.testing.assert_array_equal(anomaly_label(np.array([120.0]), np.array([80.0])), [0])


def test_a_few_training_steps_lower_the_loss(tiny_windows) -> None:  # type: ignore[no-untyped-def]
    ws = tiny_windows.subset(tiny_windows.quality_ok)
    train_idx, val_idx = split_subjects(ws.subject, 0.34, seed=0)
    train, val = ws.subset(train_idx), ws.subset(val_idx)
    torch.manual_seed(0)
    net = BpNet(NetworkConfig(stem_channels=8, stage_channels=(8, 16), lstm_hidden=16))
    from bpstream.shared.model.network import TargetStats

    stats = TargetStats(sbp_mean=float(train.sbp.mean()), sbp_std=float(train.sbp.std()) + 1,
                        dbp_mean=float(train.dbp.mean()), dbp_std=float(train.dbp.std()) + 1)

    def train_mse(model: BpNet) -> float:
        p = predict_net(model.eval(), train.x, stats)
        return float(np.mean((p[:, 0] - train.sbp) ** 2 + (p[:, 1] - train.dbp) ** 2))

    before = train_mse(net)
    res = train_model(train, val, cfg=TrainConfig(max_epochs=6, patience=100, progress=False, lr=3e-3,
                                                   ecg_dropout=0.0, augment=False), init=net, stats=stats)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # the restored best-on-validation weights fit the training windows better than the initial ones
    assert train_mse(res.net) < before


def test_training_refuses_overlapping_subjects(tiny_windows) -> None:  # type: ignore[no-untyped-def]
    ws = tiny_windows
    with pytest.raises(SubjectLeakError):
        train_model(ws, ws.subset(np.arange(3)), NetworkConfig(stem_channels=4, stage_channels=(4,), lstm_hidden=4),
                    TrainConfig(max_epochs=1, progress=False))


def test_within_subject_partners_come_from_the_same_subject() -> None:
    subject = np.array(["b", "a", "c", "a", "b", "a", "c"])
    draw = _subject_partners(subject)
    rng = np.random.default_rng(0)
    idx = np.tile(np.arange(subject.size), 50)
    partners = draw(idx, rng)
    np.testing.assert_array_equal(subject[partners], subject[idx])
    # every window of a subject can be drawn as a partner (subject "a" has windows 1, 3 and 5)
    assert set(partners[subject[idx] == "a"].tolist()) == {1, 3, 5}


def test_training_with_augmentation_and_pair_loss_lowers_the_loss(tiny_windows) -> None:  # type: ignore[no-untyped-def]
    ws = tiny_windows.subset(tiny_windows.quality_ok)
    train_idx, val_idx = split_subjects(ws.subject, 0.34, seed=0)
    train, val = ws.subset(train_idx), ws.subset(val_idx)
    res = train_model(train, val, NetworkConfig(stem_channels=8, stage_channels=(8, 16), lstm_hidden=16),
                      TrainConfig(max_epochs=6, patience=100, progress=False, lr=3e-3, augment=True,
                                  pair_weight=1.0))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0], losses
