import pytest

from rollout_service.metrics_eval import pass_at_k, summarize


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than k
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_summary_matches_a_hand_computed_table():
    scores = {"a": [1, 0, 0, 1], "b": [1, 1, 1, 1], "c": [0, 0, 0, 0]}
    s = summarize(scores, ks=(1, 2, 8))
    # mean@4: (0.5 + 1 + 0) / 3; variance: (0.25 + 0 + 0) / 3
    assert s["mean_score"] == pytest.approx(0.5)
    assert s["variance"] == pytest.approx(0.25 / 3)
    assert s["pass@1"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert s["pass@2"] == pytest.approx(((1 - 1 / 6) + 1 + 0) / 3)
    assert "pass@8" not in s  # k above N is not estimable


def test_ragged_samples_are_rejected():
    with pytest.raises(ValueError, match="same non-zero number"):
        summarize({"a": [1, 0], "b": [1]})
