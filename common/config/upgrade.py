"""A stored config of an older run, brought up to date: the one place old runs' defaults live.

A run directory keeps its resolved config (``.hydra/config.yaml``). Settings added since a
run was made are absent from it; :func:`upgrade` fills each with the value that reproduces
what that run did (not today's default: a resumed run must train, and its report describe,
the run it was). Every reader of a stored config (resume, ``fedpriv report``, export,
predict, explain) goes through ``common.rundir.RunDir.config``, so the code that reads a
config finds every key and holds no default of its own; ``conf/`` holds today's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

#: Settings an older run's config may lack -> what that run did without them.
OLD_RUNS: dict[str, Any] = {
    "task": "sequence_classification",
    "simulation": {"in_flight_per_worker": None, "runtime": "engine"},
    # Before these existed the encoder trained, through HF's pooler, unnormalised.
    "model": {"freeze_encoder": False, "pooling": "pooler", "normalize": None, "token_layer": -1},
    # Before recipes existed every round trained through the encoder.
    "recipe": {
        "name": "finetune",
        "prototypes": False,
        "prototype_share": 0.5,
        "prototype_scale": 20.0,
        "head_lr": None,
        "encoder_rounds": None,
    },
    "train": {"sample_rate": None, "sample_rate_dp": 0.25, "sample_rate_no_dp": 0.05, "outside_weight": 1.0},
    # Before `auto` existed num_shares and threshold were explicit: the assumptions only inform `auto`.
    "secaggplus": {"corrupt_fraction": 0.05, "dropout_fraction": 0.05},
    # Before distributed noise existed every client added all of its noise.
    "privacy": {
        "sample": {
            "noise": "local",
            "distributed": {
                "n_min": 0.9,
                "granularity": 1024,
                "sample_rate": 1.0,
                "count_units": 256,
                "prototype_share": 0.8,
            },
        }
    },
    # Before tracking existed no run went to a tracker.
    "tracking": {"name": "none", "uri": None},
    # Before personal models existed no client held data out or kept a personal model.
    "data": {"client_test_fraction": 0.0},
    "evaluation": {"client_every": 0},
    "personalize": {"name": "none"},
}
#: Keys an older run's config may hold that are no longer settings: dropped.
GONE = (("model", "_target_"),)


def upgrade(cfg: Mapping) -> dict:
    """A copy of ``cfg`` with every setting it lacks filled as its run had it (see :data:`OLD_RUNS`)."""
    out = copy.deepcopy(dict(cfg))
    _fill(out, OLD_RUNS)
    for section, key in GONE:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def _fill(node: dict, old: Mapping) -> None:
    for key, value in old.items():
        if key not in node:
            node[key] = copy.deepcopy(value)
        elif isinstance(value, Mapping) and isinstance(node[key], dict):
            _fill(node[key], value)
