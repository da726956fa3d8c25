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
import tempfile
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
TINY_FINETUNE = [
    "model=tiny_bert",
    "recipe=finetune",
    "model.pooling=pooler",
    "model.normalize=null",
    "model.freeze_encoder=false",
]


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
    return {
        "median_s": {k: statistics.median(v) for k, v in samples.items()},
        "samples_s": {k: [round(x, 4) for x in v] for k, v in samples.items()},
        "cpu_median_s": {k: statistics.median(v) for k, v in cpu.items()},
        "cpu_samples_s": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
    }


def paired_ratio(samples_a: list[float], samples_b: list[float]) -> float:
    """Median of per-repetition ratios a_i / b_i (pairs taken in the same interleaved slot)."""
    return statistics.median(a / b for a, b in zip(samples_a, samples_b))


def model_cfg(name: str) -> dict:
    """conf/model/<name>.yaml as a plain dict (for common.model.factory.build_model)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"), resolve=True)
    return cfg


def build(name: str, num_labels: int, seed: int = 0, config_overrides: dict | None = None):
    from common.model.factory import build_model

    cfg = model_cfg(name)
    cfg["config_overrides"] = {**cfg["config_overrides"], **(config_overrides or {})}
    return build_model(**cfg, num_labels=num_labels, seed=seed)


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled from a thread.

    Every ``interval`` seconds: RSS and PSS (``/proc/PID/smaps_rollup``) of the root and
    of every live descendant (for ``fedpriv simulate``: the driver, Ray's GCS, raylet and
    the client actors), summed. RSS counts pages shared between processes (the Python
    and torch libraries, Ray's object store in /dev/shm) once per process that maps them;
    PSS splits each shared page among its sharers, so its sum is the tree's real
    footprint. A short-lived peak between two samples is missed (PSS is read every
    fourth sample, new processes are found every eighth). Also kept: the CPU time
    (user + system) of the root and of the whole tree at the last sample, i.e. what the
    server side and all of it used until shortly before the end.
    """

    def __init__(self, pid: int, interval: float = 0.25, metrics: Path | None = None):
        import threading

        import psutil

        self._root, self._interval = psutil.Process(pid), interval
        self.peak_rss = self.peak_pss = self.peak_root_rss = self.peak_largest_rss = 0
        self.peak_processes = self.samples = 0
        self.root_cpu = self.tree_cpu = 0.0
        # The tree's and the root's CPU time when each round's line first appeared in
        # ``metrics`` (its run's metrics.jsonl): differences are CPU seconds per round,
        # which other jobs on a shared machine disturb far less than wall time.
        self._metrics, self.round_cpu, self.round_root_cpu = metrics, [], []
        self._cpu_of: dict[int, tuple[str, float]] = {}  # pid -> (name, CPU s at its last sample)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        # Listing the tree walks all of /proc and PSS walks each process' page tables:
        # measured, doing both every 0.25 s used 12 % of a core on a 2-core machine. So
        # RSS and CPU (cheap reads) every tick, the list every 8th, PSS every 4th.
        procs, tick = [self._root], 0
        while not self._stop.is_set():
            if tick % 8 == 0:
                try:
                    procs = [self._root, *self._root.children(recursive=True)]
                except psutil.Error:  # the root has exited
                    return
            with_pss = tick % 4 == 0
            rss = pss = largest = 0
            cpu = 0.0
            for proc in procs:
                try:
                    info = proc.memory_full_info() if with_pss else proc.memory_info()
                    times = proc.cpu_times()
                except psutil.Error:  # exited since the list was made
                    continue
                rss, largest = rss + info.rss, max(largest, info.rss)
                pss += info.pss if with_pss else 0
                cpu += times.user + times.system
                if tick % 8 == 0 or proc.pid not in self._cpu_of:
                    self._cpu_of[proc.pid] = (self._name(proc), times.user + times.system)
                else:
                    self._cpu_of[proc.pid] = (self._cpu_of[proc.pid][0], times.user + times.system)
                if proc.pid == self._root.pid:
                    self.peak_root_rss = max(self.peak_root_rss, info.rss)
                    self.root_cpu = times.user + times.system
            self.tree_cpu = max(self.tree_cpu, cpu)
            if self._metrics is not None and self._metrics.exists():
                lines = self._metrics.read_bytes().count(b"\n")
                while len(self.round_cpu) < lines:
                    self.round_cpu.append(round(self.tree_cpu, 2))
                    self.round_root_cpu.append(round(self.root_cpu, 2))
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_largest_rss = max(self.peak_largest_rss, largest)
            self.peak_processes = max(self.peak_processes, len(procs))
            self.samples, tick = self.samples + 1, tick + 1
            self._stop.wait(self._interval)

    def _name(self, proc) -> str:
        import psutil

        if proc.pid == self._root.pid:
            return "driver"
        try:  # Ray names its workers in the title ("ray::ClientAppActor.run"); others by their executable
            title = " ".join(proc.cmdline()[:1]) or proc.name()
        except psutil.Error:
            return "?"
        return title.split("/")[-1].split(" ")[0].split(".")[0] if "::" not in title else title.split(".")[0]

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds per process name (actors summed), as last sampled."""
        out: dict[str, float] = {}
        for name, cpu in self._cpu_of.values():
            out[name] = round(out.get(name, 0.0) + cpu, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self) -> dict:
        mib = 1 << 20
        return {
            "peak_tree_rss_mib": round(self.peak_rss / mib, 1),
            "peak_tree_pss_mib": round(self.peak_pss / mib, 1),
            "peak_driver_rss_mib": round(self.peak_root_rss / mib, 1),
            "peak_largest_process_rss_mib": round(self.peak_largest_rss / mib, 1),
            "peak_processes": self.peak_processes,
            "samples": self.samples,
            "interval_s": self._interval,
            "driver_cpu_s": round(self.root_cpu, 1),
            "tree_cpu_s": round(self.tree_cpu, 1),
            "tree_cpu_s_at_round_end": self.round_cpu,
            "driver_cpu_s_at_round_end": self.round_root_cpu,
            "cpu_s_by_process": self.cpu_by_process(),
        }


def simulate(overrides: list[str], run_dir: Path, *, timeout: float = 1800, memory: bool = False) -> dict:
    """``fedpriv simulate OVERRIDES`` in a fresh process from the repository root (relative
    data paths such as ../shared/data/... resolve from there), as a user runs it.

    Returns {"wall_s": whole command, "rounds": metrics.jsonl records}, and with ``memory``
    also "memory": the process tree's peaks (:class:`TreeMemory`) and "ru_maxrss_mib",
    the kernel's peak RSS of the largest single process among the command and the
    descendants it reaped (``wait4``), a cross-check that misses no short peak.
    """
    import contextlib
    import shutil
    import subprocess

    from common.report import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "simulate", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        )
        from common.rundir import RunDir

        sampler = TreeMemory(proc.pid, metrics=RunDir(run_dir).metrics) if memory else contextlib.nullcontext()
        try:
            with sampler:
                _, status, usage = _wait4(proc.pid, t0 + timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"fedpriv simulate failed ({proc.returncode}):\n{err.read()[-3000:]}")
    result = {"wall_s": wall, "rounds": read_metrics(run_dir)}
    if memory:
        # ru_maxrss is in KiB on Linux.
        result.update(memory=sampler.summary(), ru_maxrss_mib=round(usage.ru_maxrss / 1024, 1))
    return result


def _wait4(pid: int, deadline: float):
    """os.wait4 with a deadline (TimeoutError past it): the child's exit status and rusage."""
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got == pid:
            return got, status, usage
        if time.perf_counter() > deadline:
            raise TimeoutError(f"fedpriv simulate still running after its timeout (pid {pid})")
        time.sleep(0.2)


# The real data sets of the utility figure and of tune.py: the same runs in both.
DATASETS = {
    "banking77": lambda root: [
        "data=csv",
        f"data.path={root}/banking77/train.csv",
        f"data.test_path={root}/banking77/test.csv",
        "data.label_column=category",
    ],
    "sms_spam": lambda root: [
        "data=csv",
        f"data.path={root}/sms_spam_collection/SMSSpamCollection",
        "data.delimiter=\\t",
        "data.column_names=[label,text]",
        "data.quoting=QUOTE_NONE",
        "data.drop_duplicates=true",
        "data.test_fraction=0.2",
    ],
}
COMMON = ["num_clients=10", "partition=dirichlet", "partition.alpha=0.5"]


def dataset_overrides(name: str, root: str = "../shared/data") -> list[str]:
    """The Hydra overrides that load data set ``name`` from ``root``."""
    return DATASETS[name](root)
