"""sampling.py: the acceptance rule, the residual after a rejection, and the distribution drawn from."""

import mlx.core as mx
import numpy as np

from sampling import Sampler, accept_drafts, probabilities, residual


def test_accept_drafts_rule():
    main_probs = mx.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    draft_probs = mx.array([[0.0, 0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    drafts = [1, 3, 4]
    p = mx.array([main_probs[i, token].item() for i, token in enumerate(drafts)])
    q = mx.array([draft_probs[i, token].item() for i, token in enumerate(drafts)])
    # Ratios p/q: 2.0, 0.0, 1.0 -> accepted for any u in (0, 1] at delta 0, except the zero ratio.
    u = mx.array([1.0, 1e-9, 1.0])
    assert accept_drafts(p, q, u, 0.0).tolist() == [True, False, True]
    assert accept_drafts(p, q, u, 1.0).tolist() == [True, True, True]
    # Token 1 has probability 0.6 under the main model and 0.7 under this draft: accepted iff u - delta <= 6/7.
    for u_value, delta, expected in [(0.85, 0.0, True), (0.86, 0.0, False), (0.95, 0.1, True), (0.97, 0.1, False)]:
        verdict = accept_drafts(mx.array([0.6]), mx.array([0.7]), mx.array([u_value]), delta)
        assert verdict.tolist() == [expected]
    # The residual after a rejection is norm(max(0, p - q)).
    expected_residual = np.array([0.1, 0.3, 0.0, 0.1, 0.1]) / 0.6
    np.testing.assert_allclose(np.array(residual(main_probs[:1], draft_probs[:1]))[0], expected_residual, rtol=1e-6)


def test_probabilities_follow_temperature_top_k_top_p():
    logits = mx.array([[2.0, 1.0, 0.5, -1.0]])
    np.testing.assert_array_equal(np.array(probabilities(logits, 0.0)), [[1, 0, 0, 0]])
    full = np.exp([2.0, 1.0, 0.5, -1.0])
    np.testing.assert_allclose(np.array(probabilities(logits, 1.0))[0], full / full.sum(), rtol=1e-6)
    top2 = np.array([full[0], full[1], 0, 0])
    np.testing.assert_allclose(np.array(probabilities(logits, 1.0, top_k=2))[0], top2 / top2.sum(), rtol=1e-6)
    # top_p = 0.9: the two most likely tokens hold 0.61 + 0.22 < 0.9, so the third is kept too.
    p = full / full.sum()
    assert p[0] + p[1] < 0.9 < p[0] + p[1] + p[2]
    nucleus = np.array([p[0], p[1], p[2], 0])
    np.testing.assert_allclose(np.array(probabilities(logits, 1.0, top_p=0.9))[0], nucleus / nucleus.sum(), rtol=1e-6)


def test_greedy_judgement_accepts_the_drafts_equal_to_the_argmax():
    logits = mx.random.normal((5, 7), key=mx.random.key(0))
    choices = np.argmax(np.array(logits), axis=-1).tolist()
    drafts = mx.array([choices[0], (choices[1] + 1) % 7, choices[2], choices[3]], dtype=mx.int32)
    key = mx.random.key(1)
    accepted, extra = Sampler(0.0).judge(logits, drafts, None, 0.0, key, key)
    assert accepted.tolist() == [True, False, True, True] and extra.tolist() == choices
    # delta = 1 keeps every draft (u - 1 <= 0 for u in (0, 1]); no drafts: the argmax of the one row.
    assert Sampler(0.0).judge(logits, drafts, None, 1.0, key, key)[0].tolist() == [True] * 4
    accepted, extra = Sampler(0.0).judge(logits[:1], drafts[:0], None, 0.0, key, key)
    assert accepted.size == 0 and extra.tolist() == choices[:1]
    assert Sampler(0.0).next_token(logits, key).tolist() == choices
