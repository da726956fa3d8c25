"""A quiet terminal for ``fedpriv simulate``, each third-party message silenced where it starts.

Silenced by default, shown with ``fedpriv -v``:

- Flower's deprecation banner for ``run_simulation`` (a WARNING record of the ``flwr`` logger),
- Ray's FutureWarning about accelerator env vars and transformers' FutureWarning that peft
  triggers (``is_gradient_checkpointing``), both Python warnings,
- "Manually terminating ClientAppActor", which every Ray actor logs when the simulation ends
  and Ray forwards to the driver's terminal,
- the progress bars of ``datasets`` and of the Hugging Face hub / transformers,
- fedpriv's own INFO lines (the terminal keeps WARNING and above, and the rounds' progress bar).

Only these: fedpriv's warnings, every error and any other third-party warning still show, and
``cli.log`` (Hydra's file handler) receives everything, the silenced records included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator

#: (logger name, pattern of the formatted message) of the records the terminal omits.
_NOISE = (
    ("flwr", re.compile(r"^DEPRECATED FEATURE: The `run_simulation` function is deprecated")),
    (
        "py.warnings",
        re.compile(
            r"FutureWarning: Tip: In future versions of Ray, Ray will no longer override "
            r"accelerator visible devices"
        ),
    ),
    ("py.warnings", re.compile(r"FutureWarning: `is_gradient_checkpointing` is deprecated")),
)
#: Actor output that Ray would forward to the driver's terminal (Ray's own skip setting).
ACTOR_NOISE = r"Manually terminating ClientAppActor"
#: The same transformers FutureWarning inside the actors, as a Python warning filter (PYTHONWARNINGS
#: syntax: action:message-prefix:category); actors inherit the driver's environment.
ACTOR_WARNINGS = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


def is_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is one of the known third-party messages the terminal omits."""
    return any(record.name == name and pattern.search(record.getMessage()) for name, pattern in _NOISE)


class _OmitNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record)


def quiet_environment(environ=os.environ) -> None:
    """Settings read at import or inherited by Ray's actors: set before Flower, Ray or the
    Hugging Face libraries are imported. A value the user set is kept."""
    environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows the hub's switch
    environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", ACTOR_NOISE)  # read when ray is imported
    warnings = environ.get("PYTHONWARNINGS", "")
    if ACTOR_WARNINGS not in warnings.split(","):  # read by each new interpreter: the actors
        environ["PYTHONWARNINGS"] = ",".join(w for w in (warnings, ACTOR_WARNINGS) if w)


@contextlib.contextmanager
def quiet_terminal(*, verbose: bool) -> Iterator[None]:
    """Within: warnings become log records (so they reach ``cli.log``), Flower's records reach
    ``cli.log`` too, and the terminal omits the known noise and, unless ``verbose``, INFO.

    Call it inside the Hydra task, once Hydra has configured logging for the job: its console
    handler is the root logger's stream handler, its ``cli.log`` the root's file handler.
    """
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.common.logger import console_handler as flower_console

    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and h not in files]
    omit = _OmitNoise()
    levels = [h.level for h in consoles]
    logging.captureWarnings(True)
    for handler in files:
        FLOWER_LOGGER.addHandler(handler)  # Flower's logger does not propagate (server.app)
    for handler in [*consoles, flower_console]:
        if not verbose:
            handler.addFilter(omit)
    if not verbose:
        for handler in consoles:
            handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in files:
            FLOWER_LOGGER.removeHandler(handler)
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)
        for handler in [*consoles, flower_console]:
            handler.removeFilter(omit)


def to_log_file(logger: logging.Logger, level: int, message: str) -> None:
    """Record ``message`` in ``cli.log`` only: for what the terminal shows in its own form."""
    record = logger.makeRecord(logger.name, level, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)
