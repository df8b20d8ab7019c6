"""Metrics against hand computations, for numpy and torch inputs alike."""

import math

import numpy as np
import pytest
import torch

from seqpatch.metrics import candidate_probs, logit_diff, normalised, prob_delta


def softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


@pytest.fixture(params=["numpy", "torch"])
def arr(request):
    if request.param == "numpy":
        return lambda x: np.asarray(x, dtype=np.float32)
    return lambda x: torch.tensor(x, dtype=torch.float32)


def as_list(x):
    return np.asarray(x).tolist()


def test_candidate_probs_is_a_softmax_over_the_last_axis(arr):
    probs = candidate_probs(arr([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
    assert as_list(probs[0]) == pytest.approx(softmax([1.0, 2.0, 0.0]), abs=1e-6)
    assert as_list(probs[1]) == pytest.approx([1 / 3] * 3, abs=1e-6)


def test_logit_diff_is_source_answer_minus_target_answer(arr):
    logits = arr([[3.0, 1.0, -2.0], [0.5, 4.0, 1.0]])
    assert as_list(logit_diff(logits, 0, 2)) == pytest.approx([5.0, -0.5])
    per_pair = logit_diff(logits, np.array([0, 1]), np.array([1, 0]))
    assert as_list(per_pair) == pytest.approx([2.0, 3.5])


def test_prob_delta_by_hand(arr):
    baseline = arr([[0.0, 2.0, 0.0]])  # target prefers candidate 1 (its answer B)
    patched = arr([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # [pair, cells, candidates]
    delta = prob_delta(patched, baseline, answer_b=np.array([1]))
    p_b = softmax([0.0, 2.0, 0.0])[1]
    assert delta.shape == (1, 2)
    assert as_list(delta[0]) == pytest.approx([softmax([2.0, 0.0, 0.0])[1] - p_b, 0.0], abs=1e-6)


def test_normalised_is_zero_without_effect_and_one_at_full_switch(arr):
    target = arr([[0.0, 3.0], [1.0, 0.0]])  # pair 0: A=0, B=1; pair 1: A=1, B=0
    source = arr([[2.0, 0.0], [0.0, 4.0]])
    half_way = [[1.0, 1.5], [0.5, 2.0]]
    patched = arr(
        [
            [[[0.0, 3.0], [2.0, 0.0], half_way[0]]],  # [pair, layer=1, position=3, candidates]
            [[[1.0, 0.0], [0.0, 4.0], half_way[1]]],
        ]
    )
    a, b = np.array([0, 1]), np.array([1, 0])
    norm = as_list(normalised(patched, target, source, a, b))
    # pair 0: LD_target = -3, LD_source = 2, half way LD = -0.5 → (−0.5 + 3) / 5 = 0.5
    # pair 1: LD_target = -1, LD_source = 4, half way LD = 1.5 → 2.5 / 5 = 0.5
    assert norm[0][0] == pytest.approx([0.0, 1.0, 0.5])
    assert norm[1][0] == pytest.approx([0.0, 1.0, 0.5])


def test_normalised_is_nan_when_the_baselines_agree(arr):
    same = arr([[1.0, 0.0]])
    out = normalised(arr([[[2.0, 0.0]]]), same, same, 0, 1)
    assert math.isnan(as_list(out)[0][0])


def test_results_keep_the_input_library_and_are_float32():
    logits = np.zeros((2, 3), dtype=np.float16)
    assert logit_diff(logits, 0, 1).dtype == np.float32
    assert isinstance(logit_diff(torch.zeros(2, 3), 0, 1), torch.Tensor)
    assert logit_diff(torch.zeros(2, 3, dtype=torch.bfloat16), 0, 1).dtype == torch.float32


def test_a_misshaped_answer_index_is_refused(arr):
    with pytest.raises(ValueError, match="leading axes"):
        logit_diff(arr(np.zeros((2, 4, 3))), np.array([0, 1, 2]), 0)
