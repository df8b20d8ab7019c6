"""Metrics against hand computations, for numpy and torch inputs alike."""

import math

import numpy as np
import pytest
import torch

from seqpatch.metrics import (
    answer_prob,
    candidate_probs,
    logit_diff,
    normalised,
    prob_delta,
    prob_delta_candidates,
)


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


def test_prob_delta_candidates_by_hand(arr):
    baseline = arr([[0.0, 2.0, 0.0]])  # target prefers candidate 1 (its answer B)
    patched = arr([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # [pair, cells, candidates]
    delta = prob_delta_candidates(patched, baseline, answer_b=np.array([1]))
    p_b = softmax([0.0, 2.0, 0.0])[1]
    assert delta.shape == (1, 2)
    assert as_list(delta[0]) == pytest.approx([softmax([2.0, 0.0, 0.0])[1] - p_b, 0.0], abs=1e-6)


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_prob_delta_is_over_the_whole_vocabulary(arr):
    """A 5-token vocabulary whose candidates are tokens 0..2: tokens 3, 4 carry mass too."""
    vocab_base = [0.0, 2.0, 0.0, 1.0, 3.0]  # the target baseline's full next-token logits
    vocab_cells = [[2.0, 0.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, -1.0, 0.5]]
    baseline, patched = arr([vocab_base[:3]]), arr([[cell[:3] for cell in vocab_cells]])
    base_lse, cell_lse = arr([lse(vocab_base)]), arr([[lse(cell) for cell in vocab_cells]])
    delta = prob_delta(
        patched, baseline, np.array([1]), patched_lse=cell_lse, baseline_lse=base_lse
    )
    want = [softmax(cell)[1] - softmax(vocab_base)[1] for cell in vocab_cells]
    assert delta.shape == (1, 2)
    assert as_list(delta[0]) == pytest.approx(want, abs=1e-6)
    candidates_only = as_list(prob_delta_candidates(patched, baseline, np.array([1]))[0])
    assert candidates_only != pytest.approx(want, abs=1e-2)  # the two metrics differ here
    assert as_list(answer_prob(baseline, base_lse, 1)) == pytest.approx(
        [softmax(vocab_base)[1]], abs=1e-6
    )


def test_prob_delta_broadcasts_baselines_over_layers_and_positions(arr):
    rng = np.random.default_rng(0)
    patched, patched_lse = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4)) + 3
    baseline, baseline_lse = rng.normal(size=(2, 5)), rng.normal(size=2) + 3
    answer = np.array([4, 1])
    got = prob_delta(
        arr(patched),
        arr(baseline),
        answer,
        patched_lse=arr(patched_lse),
        baseline_lse=arr(baseline_lse),
    )
    for p in range(2):
        want = np.exp(patched[p, ..., answer[p]] - patched_lse[p])
        want -= np.exp(baseline[p, answer[p]] - baseline_lse[p])
        np.testing.assert_allclose(np.asarray(got[p]), want, atol=1e-6)
    with pytest.raises(ValueError, match="without the candidate axis"):
        prob_delta(
            arr(patched),
            arr(baseline),
            answer,
            patched_lse=arr(patched_lse[..., 0]),
            baseline_lse=arr(baseline_lse),
        )


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
