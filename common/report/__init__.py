"""The privacy report of a run, in four parts, one concern each:

* :mod:`common.report.build` — the schema-v1 dict of DESIGN.md: every ε recomputed from
  the clients' Opacus histories, the caveat policy, the schema's constants;
* :mod:`common.report.rundir` — reading a run directory: the one reader of
  ``metrics.jsonl``, and ``fedpriv report RUN_DIR`` (read → build → write);
* :mod:`common.report.plots` — the PNG figures (the only importer of matplotlib,
  and only when it draws);
* :mod:`common.report.render` — the JSON, Markdown and HTML files, from one list of
  blocks.

``from common.report import X`` keeps working for every public name (the units' words
are :mod:`common.privacy.units`'). Importing this package loads no matplotlib.
"""

from common.privacy.units import CLIENT_UNIT, SAMPLE_UNIT
from common.report.build import (
    BUDGET_CLIENT_BUDGETS,
    BUDGET_DEVICE,
    BUDGET_RUN,
    CAVEAT_EVAL_METRICS,
    CAVEAT_HELD_OUT,
    CAVEAT_NEIGHBOURS,
    CAVEAT_NO_CSPRNG,
    CAVEAT_NO_DP,
    CAVEAT_RELEASED_TO_SERVER,
    EVALUATION_KEYS,
    MODES,
    ROUND_KEYS,
    SCHEMA_VERSION,
    build_report,
    round_epsilons,
)
from common.report.plots import ACCURACY_PLOT, CONFUSION_PLOT, EPSILON_PLOT
from common.report.render import HTML_STYLE, MODE_WORDS, Block, write_report
from common.report.rundir import read_client_evaluation, read_evaluation, read_metrics, render_run_dir

__all__ = [
    "ACCURACY_PLOT",
    "BUDGET_CLIENT_BUDGETS",
    "BUDGET_DEVICE",
    "BUDGET_RUN",
    "Block",
    "CAVEAT_EVAL_METRICS",
    "CAVEAT_HELD_OUT",
    "CAVEAT_NEIGHBOURS",
    "CAVEAT_NO_CSPRNG",
    "CAVEAT_NO_DP",
    "CAVEAT_RELEASED_TO_SERVER",
    "CLIENT_UNIT",
    "CONFUSION_PLOT",
    "EPSILON_PLOT",
    "EVALUATION_KEYS",
    "HTML_STYLE",
    "MODES",
    "MODE_WORDS",
    "ROUND_KEYS",
    "SAMPLE_UNIT",
    "SCHEMA_VERSION",
    "build_report",
    "read_client_evaluation",
    "read_evaluation",
    "read_metrics",
    "render_run_dir",
    "round_epsilons",
    "write_report",
]
