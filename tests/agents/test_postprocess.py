"""Raw outputs into scores: a softmax output is used as it is, logits get a softmax."""

import numpy as np
import pytest

from edgekit.agents.postprocess import probabilities


def test_int8_softmax_output_is_not_squashed_by_a_second_softmax():
    quantized = np.round(np.array([[0.004, 0.996]]) * 256) / 256 + np.array([[0.0, 0.004]])  # sum 1.0078
    assert probabilities(quantized)[1] == pytest.approx(quantized[0, 1])


def test_logits_get_a_softmax():
    scores = probabilities(np.array([[2.0, 0.0, -1.0]]))
    assert scores.sum() == pytest.approx(1.0) and scores.argmax() == 0 and scores[0] == pytest.approx(0.8438, abs=1e-4)
