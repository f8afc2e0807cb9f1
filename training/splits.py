"""Subject-independent splits: no subject ever has windows on both sides (each split asserts it)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class SubjectLeakError(AssertionError):
    """A subject appears in both the training and the test side of a split."""


def assert_disjoint(train_subjects: Sequence[str] | np.ndarray, test_subjects: Sequence[str] | np.ndarray) -> None:
    """Raise ``SubjectLeakError`` if any subject is on both sides."""
    overlap = set(np.asarray(train_subjects).tolist()) & set(np.asarray(test_subjects).tolist())
    if overlap:
        raise SubjectLeakError(f"{len(overlap)} subject(s) in both train and test, e.g. {sorted(overlap)[:3]}")


def group_kfold(subject: np.ndarray, k: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Subject-grouped k-fold over window indices: yields ``(train_idx, test_idx)``; ``k >= n_subjects`` is
    leave-one-subject-out. Subjects are shuffled with ``seed`` and dealt round-robin into folds."""
    subject = np.asarray(subject)
    subjects = np.array(sorted(set(subject.tolist())))
    if len(subjects) < 2:
        raise ValueError("subject-grouped cross-validation needs at least two subjects")
    k = min(k, len(subjects))
    rng = np.random.default_rng(seed)
    order = subjects[rng.permutation(len(subjects))]
    for fold in range(k):
        test_subjects = order[fold::k]
        test = np.isin(subject, test_subjects)
        train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
        assert_disjoint(subject[train_idx], subject[test_idx])
        yield train_idx, test_idx


def split_subjects(subject: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split window indices into (train, held-out) with about ``fraction`` of the SUBJECTS held out."""
    subject = np.asarray(subject)
    subjects = np.array(sorted(set(subject.tolist())))
    rng = np.random.default_rng(seed)
    n_out = max(1, round(len(subjects) * fraction))
    if n_out >= len(subjects):
        raise ValueError(f"cannot hold out {n_out} of {len(subjects)} subjects")
    held = subjects[rng.permutation(len(subjects))[:n_out]]
    mask = np.isin(subject, held)
    train_idx, held_idx = np.flatnonzero(~mask), np.flatnonzero(mask)
    assert_disjoint(subject[train_idx], subject[held_idx])
    return train_idx, held_idx
