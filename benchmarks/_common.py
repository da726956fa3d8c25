"""Helpers shared by the benchmark scripts (not a test, not part of the package).

Timings are ratios measured in one driver process: variants are run interleaved
(A B A B ...), after warm-up, several repetitions, and the median is reported, so
that a machine shared with other jobs shifts both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: tiny_bert as the machinery benchmarks measured it: HF's classifier over BERT's pooler with
#: the encoder trainable (conf/model/tiny_bert.yaml now defaults to the recipe's frozen,
#: mean-pooled features, which recipe=finetune cannot train).
TINY_FINETUNE = ["model=tiny_bert", "recipe=finetune", "model.pooling=pooler", "model.normalize=null",
                 "model.freeze_encoder=false"]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small settings, under 2 minutes")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return p


def machine() -> dict:
    """Where the figures were measured, including how busy the machine was."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, result: dict, started: float, argv: list[str] | None = None) -> None:
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
        **result,
        "machine_after": {"load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "script_wall_s": round(time.monotonic() - started, 2),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def interleaved(variants: Mapping[str, Callable[[], object]], *, reps: int, warmup: int = 1) -> dict:
    """Median wall and CPU time of each variant, run A B A B ... (warm-up rounds discarded).

    CPU time (this process' user + system time) is reported beside wall time: on a
    machine shared with other jobs it is far less disturbed by them.
    Returns {"median_s": {...}, "samples_s": {...}, "cpu_median_s": {...}, "cpu_samples_s": {...}}.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + reps):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                samples[name].append(dt)
                cpu[name].append(dc)
    return {"median_s": {k: statistics.median(v) for k, v in samples.items()},
            "samples_s": {k: [round(x, 4) for x in v] for k, v in samples.items()},
            "cpu_median_s": {k: statistics.median(v) for k, v in cpu.items()},
            "cpu_samples_s": {k: [round(x, 4) for x in v] for k, v in cpu.items()}}


def paired_ratio(samples_a: list[float], samples_b: list[float]) -> float:
    """Median of per-repetition ratios a_i / b_i (pairs taken in the same interleaved slot)."""
    return statistics.median(a / b for a, b in zip(samples_a, samples_b))


def model_cfg(name: str) -> dict:
    """conf/model/<name>.yaml as a plain dict (for common.model.build_model)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"), resolve=True)
    cfg.pop("_target_", None)
    return cfg


def build(name: str, num_labels: int, seed: int = 0, config_overrides: dict | None = None):
    from common.model import build_model

    cfg = model_cfg(name)
    cfg["config_overrides"] = {**cfg["config_overrides"], **(config_overrides or {})}
    return build_model(**cfg, num_labels=num_labels, seed=seed)


def simulate(overrides: list[str], run_dir: Path, *, timeout: float = 1800) -> dict:
    """``fedpriv simulate OVERRIDES`` in a fresh process from the repository root (relative
    data paths such as ../shared/data/... resolve from there), as a user runs it.

    Returns {"wall_s": whole command, "rounds": metrics.jsonl records}.
    """
    import shutil
    import subprocess

    from common.report import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "simulate", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fedpriv simulate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "rounds": read_metrics(run_dir)}

