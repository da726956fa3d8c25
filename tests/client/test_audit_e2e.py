"""fedpriv audit checked against itself: power with noise off, soundness with DP on.

Both runs use the ``audit=power`` preset (conf/audit/power.yaml) and one scoring; only
σ differs. The preset is chosen for power at a small cost (the audit audits whatever
DP-SGD run it is given): few real examples (held-out test examples, as many as client
0 holds: no client's data), short sequences, no dropout, a small learning rate so that
each round's update stays close to a sum of the sampled examples' clipped gradients at
the round's start, and 2 rounds of 3 local epochs so that every included canary is
almost surely sampled. The real pretrained encoder is needed: a random-init tiny BERT
maps random-token canaries to nearly the same representation (measured: chance-level
guesses). The noise-off run goes through the command line, as a user runs it.
"""

import json
import math

import pytest

from client.canary_audit import run_audit

PRESET = ["audit=power"]
# 60 "in" + 60 "out": all right gives 3.66, one wrong 3.19, two wrong 2.90. Measured:
# 120/120 in every run, the lowest included score ~5x the highest excluded one. What
# can still cost guesses: fewer than 60 canaries drawn "in" (or "out"), P ~ 0.06 % each,
# or an included canary never sampled in 18 steps at q = 1/3, P ~ 5 % for one of ~80.
CANARIES, GUESSES = 160, 120


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    from tests.conftest import ROOT, compose, run_fedpriv

    run_dir = tmp_path_factory.mktemp("audit") / "off"
    done = run_fedpriv(["audit", *PRESET, "audit.noise=false", f"hydra.run.dir={run_dir}"], cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    off = json.loads((run_dir / "audit.json").read_text())["audit"]
    off["stdout"] = done.stdout
    cfg = compose(PRESET, tmp_path_factory.mktemp("audit") / "dp")
    return {
        False: off,
        True: run_audit(
            cfg,
            canaries=CANARIES,
            guesses=GUESSES,
            client=cfg["audit"]["client"],
            noise=True,
            confidence=cfg["audit"]["confidence"],
        ),
    }


@pytest.mark.e2e
def test_with_dp_the_bound_stays_below_the_accounted_epsilon_and_120_guesses_cannot_confirm_8(audits):
    dp = audits[True]
    assert 0 < dp["epsilon_accounted"] <= 8.0 + 0.01
    assert dp["noise_multiplier"] > 0 and dp["rounds"] == 2
    assert dp["epsilon_lower_bound"] <= dp["epsilon_accounted"]
    assert dp["max_detectable_epsilon"] == pytest.approx(3.656, abs=1e-3)
    assert dp["max_detectable_epsilon"] < dp["epsilon_accounted"]
    assert dp["verdict"] == "inconclusive"
    assert dp["guesses"] == GUESSES and 0 < dp["canaries_included"] < CANARIES
    assert dp["real_examples"] == 10 and "test split" in dp["real_data"]


@pytest.mark.e2e
def test_with_noise_off_the_preset_on_the_command_line_reports_a_bound_of_3(audits):
    off = audits[False]
    assert off["epsilon_accounted"] == math.inf and off["noise_multiplier"] == 0.0
    assert off["mean_score_included"] > off["mean_score_excluded"]
    assert off["epsilon_lower_bound"] >= 3.0
    assert off["verdict"] == "inconclusive" and "consistent" not in off["stdout"]
    assert "120 guesses can show at most 3.656" in off["stdout"]
