"""fedpriv audit checked against itself: power with noise off, soundness with DP on.

Both runs use one config and one scoring; only σ differs. The config is chosen for
power at a small cost (the audit audits whatever DP-SGD run it is given): few real
examples, short sequences, no dropout, a small learning rate so that each round's
update stays close to a sum of the sampled examples' clipped gradients at the round's
start, and 2 rounds of 3 local epochs so that every included canary is almost surely
sampled. The real pretrained encoder is needed: a random-init tiny BERT maps
random-token canaries to nearly the same representation (measured: chance-level guesses).
"""

import math

import pytest

from client.audit import run_audit

AUDITED = ["model=minilm_lora", "+model.config_overrides.hidden_dropout_prob=0.0",
           "+model.config_overrides.attention_probs_dropout_prob=0.0",
           "data.train_size=40", "data.test_size=20", "train.max_length=8", "train.batch_size=32",
           "train.lr=0.2", "train.local_epochs=3", "rounds=2"]
# 60 "in" + 60 "out": all right gives 3.66, one wrong 3.19, two wrong 2.90. Measured:
# 120/120 in every run, the lowest included score ~5x the highest excluded one. What
# can still cost guesses: fewer than 60 canaries drawn "in" (or "out"), P ~ 0.06 % each,
# or an included canary never sampled in 18 steps at q = 1/3, P ~ 5 % for one of ~80.
CANARIES, GUESSES = 160, 120


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    from tests.conftest import compose

    cfg = compose(AUDITED, tmp_path_factory.mktemp("audit") / "run")
    return {noise: run_audit(cfg, canaries=CANARIES, guesses=GUESSES, noise=noise) for noise in (False, True)}


@pytest.mark.e2e
def test_with_dp_the_bound_stays_below_the_accounted_epsilon(audits):
    dp = audits[True]
    assert 0 < dp["epsilon_accounted"] <= 8.0 + 0.01
    assert dp["noise_multiplier"] > 0 and dp["rounds"] == 2
    assert dp["epsilon_lower_bound"] <= dp["epsilon_accounted"] and dp["consistent"]
    assert dp["guesses"] == GUESSES and 0 < dp["canaries_included"] < CANARIES


@pytest.mark.e2e
def test_with_noise_off_the_bound_reaches_3(audits):
    off = audits[False]
    assert math.isinf(off["epsilon_accounted"]) and off["noise_multiplier"] == 0.0
    assert off["mean_score_included"] > off["mean_score_excluded"]
    assert off["epsilon_lower_bound"] >= 3.0
