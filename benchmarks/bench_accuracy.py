"""Benchmark: how well the calibrated simulator predicts real runs on this machine.

For every configuration of ``accuracy_set.json`` (fixed before any result was seen): profile
the network once per mode (``partime-sim profile``, calibrated on the backend), predict the run
with that profile, run it for real (distributed transport, one thread per worker) and record
the relative error of the predicted throughput. Goal: mean absolute percentage error <= 5%.

Both sides are noisy on a shared VM (the same run's throughput moves by 20-30% from one run to
the next), so the whole set is repeated ``--repeats`` times, rounds interleaved (a slow phase of
the machine hits every configuration, not one), each round with fresh profiles; the error of a
configuration compares the median prediction with the median measurement. The MAPE of single
rounds is printed too, and the measurement's own noise floor (odd rounds against even rounds).

Within a round each configuration is run ``--runs`` times (default 3), in as many passes over
the set, and the median run counts: a 300-sample lenet run lasts 0.3-0.4 s, and one run moved by
half from one round to the next (session 25: spread 42-106% over 8 rounds), more than the model's
misses.

Run: python benchmarks/bench_accuracy.py [--quick] [--repeats R] [--runs N] [--message-costs SOURCE[,SOURCE...]]
(prints Markdown for BENCHMARKS.md; several sources predict every run with each profile, paired;
``both`` = ``measured,backend``; ``backend-no-tokens``, listed after ``backend``, is its profile
with the barrier as measured, no token cost)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

from partime_sim.analysis.compare import CompareConfig, compare, predict, real_run_config
from partime_sim.backends.profiler import Profile, calibrate_message_costs, profile, with_message_costs
from partime_sim.backends.run import run_config
from partime_sim.metrics import summarize

SET = Path(__file__).with_name("accuracy_set.json")
FIT_SCHEDULES = {"backend": {"train": "pipedream", "infer": "pipedream"},  # source -> mode -> fitted schedule
                 "backend-layerpipe": {"train": "layerpipe", "infer": "pipedream"}}
UNTOKENED = "backend-no-tokens"  # the "backend" profile with barriers as measured, no token cost (paired)
SOURCES = ("measured", *FIT_SCHEDULES, UNTOKENED)


def one_round(spec: dict, samples_div: int, tmp: Path, rnd: int,
              sources: tuple[str, ...] = ("measured",), runs: int = 1) -> list[tuple[float, ...]]:
    """(measured, then predicted with each message-cost source) throughput of every configuration,
    from this round's own profiles. ``"backend"`` fits the profiles' message cost to pipedream
    runs in their mode (``calibrate_message_costs``), ``"backend-layerpipe"`` to layerpipe runs in
    training (a schedule outside the set; pipedream in inference); with several sources every run
    is predicted by each profile, paired: the same run, the same split. The measurement is the
    median of ``runs`` real runs, taken in ``runs`` passes over the set (a slow phase of the
    machine, which lasts tens of seconds, then hits one run of several configurations rather
    than every run of one)."""
    profiles: dict[tuple[str, str], dict[str, Profile]] = {}
    paths: dict[tuple[str, str], str] = {}  # the first source's profile, saved for compare
    predicted, measured, again = [], [], []
    for cfg in spec["configs"]:
        key = (cfg["network"], cfg["mode"])
        if key not in profiles:
            prof = profile(cfg["network"], ["cpu", "cpu"], "distributed", mode=cfg["mode"], threads=1)
            profiles[key] = {source: prof if source == "measured" else calibrate_message_costs(
                prof, schedule=FIT_SCHEDULES[source][cfg["mode"]]) for source in sources if source != UNTOKENED}
            if UNTOKENED in sources:
                fitted = profiles[key]["backend"]
                profiles[key][UNTOKENED] = with_message_costs(fitted, fitted.meta["message_cost_s"], tokens=False)
            paths[key] = str(tmp / f"{rnd}-{len(paths)}.json")
            profiles[key][sources[0]].save(paths[key])
        samples = spec["samples"][cfg["mode"]] // samples_div
        cmp_cfg = CompareConfig(cfg["network"], cfg["schedule"], cfg["devices"], samples=samples, mode=cfg["mode"],
                                transport="distributed", profile=paths[key], microbatches=cfg.get("microbatches"),
                                threads=1, baseline=False, learning=False,
                                message_costs="measured")  # the profile as prepared
        result = compare(cmp_cfg)
        stages = result.predicted["devices"]
        split = ",".join(map(str, result.predicted["partition"]))
        predicted.append((result.predicted["throughput_sps"],
                          *(predict(profiles[key][s], cfg["schedule"], stages, samples, cfg["mode"],
                                    cfg.get("microbatches"), split)[0]["throughput_sps"] for s in sources[1:])))
        measured.append([result.measured["throughput_sps"]])
        again.append((real_run_config(cmp_cfg, result.predicted["partition"]), stages))
    for _ in range(runs - 1):  # the further runs, pass by pass, with the first run's split
        for each, (run_cfg, stages) in zip(measured, again):
            each.append(summarize(run_config(run_cfg)[1].trace, num_devices=stages)["throughput_sps"])
    out = []
    for cfg, pred, each in zip(spec["configs"], predicted, measured):
        out.append((float(np.median(each)), *pred))
        print(f"  round {rnd + 1}: {cfg['network']} {cfg['schedule']} {cfg['mode']}: measured {out[-1][0]:,.0f}"
              + (f" (runs {', '.join(f'{x:,.0f}' for x in each)})" if len(each) > 1 else "") + ", "
              "predicted " + ", ".join(f"{p:,.0f} ({s})" for s, p in zip(sources, pred)) + " samples/s",
              flush=True)
    return out


def noise_floor(measured: np.ndarray) -> float:
    """MAPE (%) of the median of the odd rounds against the median of the even rounds of the
    measurement, (round, config): how far the measurement moves by itself."""
    odd, even = np.median(measured[0::2], axis=0), np.median(measured[1::2], axis=0)
    return float(100 * np.mean(np.abs(odd / even - 1)))


def _cell(values: np.ndarray) -> str:
    """The median, then every round's value."""
    return f"{np.median(values):,.0f}; " + ", ".join(f"{x:,.0f}" for x in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the samples, one round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the whole set (default 3)")
    parser.add_argument("--runs", type=int, default=3,
                        help="real runs per configuration and round, the median counts (default 3)")
    parser.add_argument("--message-costs", default="backend",
                        help="profiles' message cost, comma-separated for several (every run predicted by each, "
                             "paired): backend (fitted to pipedream runs, the default, as compare's), "
                             "backend-layerpipe (fitted to layerpipe runs in training), measured (the profile's "
                             "figure); both = measured,backend")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error(f"--repeats {repeats} must be at least 1")
    if args.runs < 1:
        parser.error(f"--runs {args.runs} must be at least 1")
    sources = tuple(("measured,backend" if args.message_costs == "both" else args.message_costs).split(","))
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or len(set(sources)) != len(sources):
        parser.error(f"--message-costs {args.message_costs!r}: give distinct sources from {', '.join(SOURCES)} "
                     "(or both)")
    if UNTOKENED in sources and "backend" not in sources[:sources.index(UNTOKENED)]:
        parser.error(f"--message-costs {args.message_costs!r}: {UNTOKENED} is derived from the backend profile; "
                     f"list backend before it (e.g. measured,backend,{UNTOKENED})")
    spec = json.loads(SET.read_text())
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"Python {platform.python_version()}; date {date.today()}; {repeats} round(s), "
          f"{args.runs} run(s) per configuration and round\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rounds = np.array([one_round(spec, 4 if args.quick else 1, Path(tmp), r, sources, args.runs)
                           for r in range(repeats)])
    meas = rounds[..., 0]  # (round, config)
    for k, source in enumerate(sources, start=1):
        pred = rounds[..., k]
        err = np.median(pred, axis=0) / np.median(meas, axis=0) - 1
        print(f"\nMessage costs: {source}\n\n| network | schedule | devices | mode | predicted samples/s (median; "
              "rounds) | measured samples/s (median; rounds) | error of medians |")
        print("|---|---|---|---|---|---|---|")
        for j, cfg in enumerate(spec["configs"]):
            print(f"| {cfg['network']} | {cfg['schedule']} | {cfg['devices']} | {cfg['mode']} | "
                  f"{_cell(pred[:, j])} | {_cell(meas[:, j])} | {100 * err[j]:+.1f}% |")
        per_round = 100 * np.mean(np.abs(pred / meas - 1), axis=1)
        print(f"\nMean absolute percentage error of predicted throughput, message costs {source} (medians over "
              f"{repeats} round(s)): **{100 * np.mean(np.abs(err)):.1f}%** over {len(err)} configurations "
              f"(goal <= 5%); single rounds: {', '.join(f'{x:.1f}%' for x in per_round)}.")
    if repeats > 1:
        spread = 100 * (meas.max(axis=0) / meas.min(axis=0) - 1)
        print(f"Run-to-run spread of the measurement (max/min - 1) per configuration: "
              f"{', '.join(f'{x:.0f}%' for x in spread)}.")
        print(f"Noise floor: the measurement against itself, the median of the odd rounds against the median "
              f"of the even rounds, scores a MAPE of {noise_floor(meas):.1f}% (what a perfect prediction would "
              f"score with half the rounds).")


if __name__ == "__main__":
    main()
