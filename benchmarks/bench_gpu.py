"""Benchmark (needs a CUDA GPU): PARTIME's streams on one GPU, with and without CUDA graphs, against
the sequential network with and without a CUDA graph, as PARTIME measures it (batch of one
sample, a continuous stream). Every stage of a pipeline runs on the same GPU in its own thread
and CUDA stream (``--devices cuda:0,cuda:0,...``, local transport). Inference is measured with
and without graphs; training (eager only: the backend captures inference forwards) against the
sequential training run.

Run: python benchmarks/bench_gpu.py [--quick] [--res 256] [--stages 2,4,8]   (prints Markdown for BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import torch

from partime_sim.backends.run import RunConfig, run_config


def throughput(network: str, schedule: str, stages: int, samples: int, mode: str, graphs: bool) -> float:
    devices = ",".join(["cuda:0"] * stages)
    row, _ = run_config(RunConfig(network, schedule, devices, transport="local", samples=samples, mode=mode,
                                  cuda_graphs=graphs))
    return float(row["throughput_sps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 frames, 60 samples, 2 stages")
    parser.add_argument("--res", type=int, default=256, help="frame side of partime-conv30 [256, as PARTIME]")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--stages", default="2,4,8", help="pipeline lengths on the one GPU [2,4,8]")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine")
    res, samples, counts = (64, 60, [2]) if args.quick else (args.res, args.samples,
                                                             [int(s) for s in args.stages.split(",")])
    net = f"partime-conv30@{res}"
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, Python {platform.python_version()}; "
          f"date {date.today()}\n")
    print(f"{net}, batch 1, {samples} samples, local transport, every stage on cuda:0.\n")
    print("| mode | run | CUDA graphs | samples/s | vs sequential eager |\n|---|---|---|---|---|")
    for mode in ("infer", "train"):
        graph_options = (False, True) if mode == "infer" else (False,)
        base = throughput(net, "sequential", 1, samples, mode, False)
        runs = [("sequential", 1)] + [("partime", S) for S in counts]
        for schedule, S in runs:
            for graphs in graph_options:
                sps = base if (schedule, graphs) == ("sequential", False) else throughput(
                    net, schedule, S, samples, mode, graphs)
                label = "sequential" if S == 1 else f"partime, {S} streams"
                print(f"| {mode} | {label} | {'yes' if graphs else 'no'} | {sps:,.1f} | {sps / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
