"""Benchmark (needs a CUDA GPU): PARTIME's streams on one GPU, with and without CUDA graphs, against
the sequential network with and without a CUDA graph, as PARTIME measures it (batch of one
sample, a continuous stream). Stages go round-robin on the visible GPUs, each in its own thread
and CUDA stream (one GPU: ``--devices cuda:0,cuda:0,...``, local transport); the measurement is
``paper.measured_gpu.measure_streams``, which ``partime-sim paper`` runs on a GPU machine too.
Inference is measured with and without graphs; training (eager only: the backend captures
inference forwards) against the sequential training run.

Run: python benchmarks/bench_gpu.py [--quick] [--res 256] [--stages 2,4,8]   (prints Markdown for BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import torch

from partime_sim.paper.measured_gpu import measure_streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 frames, 60 samples, 2 stages")
    parser.add_argument("--res", type=int, default=256, help="frame side of partime-conv30 [256, as PARTIME]")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--stages", default="2,4,8", help="pipeline lengths [2,4,8]")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine")
    res, samples, counts = (64, 60, [2]) if args.quick else (args.res, args.samples,
                                                             [int(s) for s in args.stages.split(",")])
    net, gpus = f"partime-conv30@{res}", torch.cuda.device_count()
    print(f"GPU: {torch.cuda.get_device_name(0)} x{gpus}; torch {torch.__version__}, Python "
          f"{platform.python_version()}; date {date.today()}\n")
    print(f"{net}, batch 1, {samples} samples, local transport, stages round-robin on {gpus} GPU(s).\n")
    table = measure_streams(net, samples, counts, gpus)
    table["run"] = ["sequential" if S == 1 else f"partime, {S} stages on {g} GPU(s)"
                    for S, g in zip(table.stages, table.gpus)]
    table["cuda_graphs"] = table.cuda_graphs.map({True: "yes", False: "no"})
    print(table[["mode", "run", "cuda_graphs", "samples_per_s", "speedup", "speedup_vs_graphed"]]
          .to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
