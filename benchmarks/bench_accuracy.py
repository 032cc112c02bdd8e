"""Benchmark: how well the calibrated simulator predicts real runs on this machine.

For every configuration of ``accuracy_set.json`` (fixed before any result was seen): profile
the network once per mode (``partime-sim profile``, calibrated on the backend), predict the run
with that profile, run it for real (distributed transport, one thread per worker) and record
the relative error of the predicted throughput. Goal: mean absolute percentage error <= 5%.

Run: python benchmarks/bench_accuracy.py [--quick]   (prints Markdown for BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

from partime_sim.analysis.compare import CompareConfig, compare
from partime_sim.backends.profiler import profile

SET = Path(__file__).with_name("accuracy_set.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the samples")
    args = parser.parse_args()
    spec = json.loads(SET.read_text())
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"Python {platform.python_version()}; date {date.today()}\n")
    print("| network | schedule | devices | mode | predicted samples/s | measured samples/s | error |")
    print("|---|---|---|---|---|---|---|")
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        profiles: dict[tuple[str, str], str] = {}
        for cfg in spec["configs"]:
            key = (cfg["network"], cfg["mode"])
            if key not in profiles:
                path = str(Path(tmp) / f"{len(profiles)}.json")
                profile(cfg["network"], ["cpu", "cpu"], "distributed", mode=cfg["mode"], threads=1).save(path)
                profiles[key] = path
            samples = spec["samples"][cfg["mode"]] // (4 if args.quick else 1)
            result = compare(CompareConfig(cfg["network"], cfg["schedule"], cfg["devices"], samples=samples,
                                           mode=cfg["mode"], transport="distributed", profile=profiles[key],
                                           microbatches=cfg.get("microbatches"), threads=1, baseline=False))
            err = result.error["throughput_sps"]
            errors.append(abs(err))
            print(f"| {cfg['network']} | {cfg['schedule']} | {cfg['devices']} | {cfg['mode']} | "
                  f"{result.predicted['throughput_sps']:,.0f} | {result.measured['throughput_sps']:,.0f} | "
                  f"{100 * err:+.1f}% |", flush=True)
    print(f"\nMean absolute percentage error of predicted throughput: **{100 * sum(errors) / len(errors):.1f}%** "
          f"over {len(errors)} configurations (goal <= 5%).")


if __name__ == "__main__":
    main()
