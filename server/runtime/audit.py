"""``fedpriv audit``: one run's empirical lower bound on ε, judged against the accounted ε.

Canaries among held-out examples, one training run, and the bound the guesses give. The
audit trains like a client, so its runner is client code: the CLI hands in its loader (the
``fedpriv.commands`` entry point ``audit``), and only the verdict's one rule is decided here
(``common.privacy.audit_bounds.verdict``).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from common.rundir import RunDir


def run(overrides: list[str], runner: Callable[[], Callable[..., dict]]) -> int:
    """Run the audit the Hydra ``overrides`` describe; print and write (``audit.json``) the bound and the verdict.

    ``runner`` loads the audit's runner; it is called once the config passed.

    Every verdict line states the audit's power (the bound all guesses right would
    give). ``exceeds`` (bound above the accounted ε) exits 1; ``inconclusive`` (the power
    is below the accounted ε: the audit could not have confirmed it) and ``consistent``
    exit 0. ``audit=power`` selects the preset with measured power (conf/audit/power.yaml).
    """
    from common.config.validate import validate
    from common.privacy.audit_bounds import EXCEEDS, verdict
    from server.runtime.compose import compose_config

    cfg, run_dir = compose_config(overrides)
    validate(cfg)
    a = cfg["audit"]
    result = runner()(
        cfg,
        canaries=int(a["canaries"]),
        guesses=int(a["guesses"]),
        client=int(a["client"]),
        noise=bool(a["noise"]),
        confidence=float(a["confidence"]),
    )
    bound, power = float(result["epsilon_lower_bound"]), float(result["max_detectable_epsilon"])
    accounted = float(result["epsilon_accounted"])
    result["verdict"] = found = verdict(bound, power, accounted)  # one rule, whoever ran the audit
    run_dir.mkdir(parents=True, exist_ok=True)
    out = RunDir(run_dir).audit
    out.write_text(json.dumps({"config": cfg, "audit": result}, indent=2, default=str) + "\n")
    print(
        f"fedpriv audit: {result['correct']}/{result['guesses']} canary guesses right "
        f"({result['canaries']} canaries) -> epsilon >= {bound:.3f} at {result['confidence']:.0%} confidence; "
        f"power: {result['guesses']} guesses can show at most {power:.3f}; {_says(result)}; {out}"
    )
    return 1 if found == EXCEEDS else 0


def _says(result: dict) -> str:
    """The verdict in words, with the numbers it rests on."""
    from common.privacy.audit_bounds import CONSISTENT, EXCEEDS

    bound, power = float(result["epsilon_lower_bound"]), float(result["max_detectable_epsilon"])
    accounted = float(result["epsilon_accounted"])
    if result["verdict"] == EXCEEDS:
        return f"EXCEEDS: the bound {bound:.3f} is above the accounted epsilon {accounted:.3f}"
    if result["verdict"] == CONSISTENT:
        return (
            f"consistent: the bound stays within the accounted epsilon {accounted:.3f}, "
            f"which these guesses could have shown (up to {power:.3f})"
        )
    if accounted == float("inf"):  # sigma = 0: nothing bounds epsilon, the bound is the power check
        return "inconclusive: no noise, so no finite accounted epsilon to check (the bound is the power check)"
    return (
        f"inconclusive: even all {result['guesses']} guesses right would show at most {power:.3f}, "
        f"below the accounted epsilon {accounted:.3f}; checking it needs more guesses"
    )
