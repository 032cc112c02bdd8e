"""``partime-sim`` command line: what-if timing studies from the shell.

Every bad input ends in one line on stderr (``partime-sim: error: ...``) and exit status 2;
``--json`` output goes to stdout alone (progress bars go to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from partime_sim.errors import PartimeError

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"partime-sim: error: {message} (see '{self.prog} --help')\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: device counts must be integers >= 1")
    return values


def _bounded(cast: type, low: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)`` that must be >= low (> low when strict)."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value > low if strict else value >= low):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"{value} must be {'>' if strict else '>='} {low:g}")
        return value

    return parse


_positive_int = _bounded(int, 1, False, "an integer")
_non_negative_float = _bounded(float, 0, False, "a number")
_positive_float = _bounded(float, 0, True, "a number")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; give positive sizes joined by x, e.g. 3x32x32")
    return dims


def _json_path(text: str) -> Path:
    if not text.endswith(".json"):
        raise argparse.ArgumentTypeError(f"{text!r}: end the name in .json (simulate takes profiles as JSON files)")
    return Path(text)


def _trace_path(text: str) -> Path:
    path = Path(text)
    if path.suffix not in (".json", ".csv"):
        raise argparse.ArgumentTypeError(f"{text!r}: end the name in .json (Chrome/Perfetto) or .csv (table)")
    return path


def _add_study_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by simulate and sweep: what to run and on what."""
    p.add_argument("--network", required=True, help="catalogue name (see 'partime-sim networks') or a Network JSON file")
    p.add_argument("--schedule", required=True, help="schedule name (see 'partime-sim schedules') or a schedule text file")
    p.add_argument("--samples", type=_positive_int, default=256, help="samples of the stream (microbatches) [256]")
    p.add_argument("--microbatches", type=_positive_int, default=None, help="microbatches per minibatch (gpipe, zb-h1)")
    p.add_argument("--mode", choices=("train", "infer"), default="train", help="training or inference [train]")
    p.add_argument("--engine", choices=("fast", "des"), default="fast", help="timing engine [fast]")
    p.add_argument("--cluster", default="ideal", help="cluster preset (see 'partime-sim clusters') or Cluster JSON [ideal]")
    p.add_argument("--partition", default="minmax",
                   help="minmax (exact), block (PARTIME's heuristic), even, or stage sizes like 10,10,10 [minmax]")
    p.add_argument("--jitter", type=_non_negative_float, default=0.0, help="cost jitter, coefficient of variation [0]")
    p.add_argument("--stragglers", type=_non_negative_float, default=0.0, help="probability a task straggles [0]")
    p.add_argument("--straggler-factor", type=_non_negative_float, default=3.0, help="slow-down of a straggler [3]")
    p.add_argument("--arrival-rate", type=_positive_float, default=None, help="stream rate in Hz (default: saturating)")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals at --arrival-rate instead of a fixed rate")
    p.add_argument("--seed", type=int, default=0, help="seed of jitter, stragglers and Poisson arrivals [0]")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")


def _pin_cores_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-pin-cores", dest="pin_cores", action="store_false",
                   help="CPU worker processes: leave them to the OS instead of binding each to cores of its own")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="partime-sim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("simulate", help="predict the timing of one pipeline configuration")
    _add_study_args(p)
    p.add_argument("--devices", type=_positive_int, required=True, help="devices = pipeline stages")
    p.add_argument("--trace", type=_trace_path, default=None, help="write the trace: .json = Chrome/Perfetto, .csv = table")

    p = sub.add_parser("sweep", help="predict the timing over several device counts")
    _add_study_args(p)
    p.add_argument("--devices", type=_int_list, required=True, help="device counts, e.g. 1,2,4,8,...,1024")
    p.add_argument("--plot", type=Path, default=None, help="write a speed-up vs devices figure (PNG)")

    p = sub.add_parser("partition", help="compare the exact min-max partitioner with PARTIME's block heuristic")
    p.add_argument("--network", required=True)
    p.add_argument("--devices", type=_int_list, required=True, help="stage counts, e.g. 2,4,8")
    p.add_argument("--cluster", default="ideal")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("schedule", help="print a generated schedule in the compact text form")
    p.add_argument("--schedule", required=True)
    p.add_argument("--devices", type=_positive_int, required=True)
    p.add_argument("--samples", type=_positive_int, default=8)
    p.add_argument("--microbatches", type=_positive_int, default=None)
    p.add_argument("--mode", choices=("train", "infer"), default="train")

    p = sub.add_parser(
        "staleness", help="derive each stage's weight delay and gradient-signal staleness",
        description="Per stage, the steady-state staleness derived from the schedule (median over its gradients): "
                    "weight_delay = updates between the weights a gradient was computed with and the weights it is "
                    "applied to; gradient_age = the stage's own updates since the loss its gradient signal comes "
                    "from was computed; signal_mismatch = samples between the activation and that loss's sample; "
                    "gradient_age_ticks = the same age in the schedule's clock (PARTIME ticks, or unit-cost slots); "
                    "max_weight_delay = the worst delay (past weight versions to keep); first_backward_tick = the "
                    "end of the stage's warm-up.")
    p.add_argument("--schedule", required=True,
                   help="schedule name (see 'partime-sim schedules') or a schedule text file")
    p.add_argument("--devices", type=_positive_int, required=True, help="devices = pipeline stages")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="samples of the stream (default 8*devices+16, enough for a steady state)")
    p.add_argument("--microbatches", type=_positive_int, default=None, help="microbatches per minibatch (gpipe, zb-h1)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")

    p = sub.add_parser("emulate", help="predict what a schedule's staleness does to learning (emulated, no devices)")
    p.add_argument("--network", required=True, help="a trainable network: mlp, lenet or uniform:L")
    p.add_argument("--schedule", required=True, help="schedule name (see 'partime-sim schedules')")
    p.add_argument("--devices", type=_positive_int, required=True, help="devices = pipeline stages")
    p.add_argument("--samples", type=_positive_int, default=2000, help="samples of the stream [2000]")
    p.add_argument("--microbatches", type=_positive_int, default=None, help="microbatches per minibatch (gpipe, zb-h1)")
    p.add_argument("--stream", default="shapes", help="shapes (smooth, default), drift, or shuffled:NAME")
    p.add_argument("--optimizer", default="sgd", help="sgd, momentum or adam [sgd]")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate [sgd 0.03, momentum 0.01, adam 1e-3]")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream and the initial weights [0]")
    p.add_argument("--seeds", type=_positive_int, default=1, help="run K seeds (seed..seed+K-1) [1]")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="JAX on a CPU: run the seeds in at most N calls side by side, e.g. 1 when several "
                        "emulations share the machine [one per core]")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--impl", choices=("jax", "torch"), default="jax", help="JAX emulator or the torch reference [jax]")
    p.add_argument("--compensation", default="none",
                   help="staleness compensation: none, stash, pipemare, predict or ema [none]")
    p.add_argument("--vs-sequential", action="store_true", help="also train sequentially and report the loss gap")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, default=None, help="write the learning curves (PNG)")

    p = sub.add_parser("profile", help="measure a network's layers and the links on this machine for the simulator",
                       description="Measure per-layer forward, BI, BW and optimizer times and activation sizes "
                                   "(one sample, warm-up, calibrated on real backend runs: per-task overheads, "
                                   "jitter, the slowdown of workers computing at once), and the links between the "
                                   "pipeline's processes (or threads) and host<->device (latency, bandwidth, barrier, "
                                   "send cost under load); write one JSON file that simulate takes as both --network "
                                   "and --cluster.")
    p.add_argument("--network", required=True, help="catalogue name (see 'partime-sim networks') or module.py:factory")
    p.add_argument("--device", required=True,
                   help="cpu, cuda or cuda:N; comma-separate several (cpu alone measures two CPU processes)")
    p.add_argument("--transport", choices=("distributed", "local"), default="distributed",
                   help="distributed: one process per stage (gloo/NCCL); local: threads of one process [distributed]")
    p.add_argument("--input-shape", type=_shape, default=None, help="one sample's shape, e.g. 3x32x32 (factories)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--mode", choices=("train", "infer"), default="train",
                   help="the runs the calibration measures (per-task overheads, slowdown) [train]")
    p.add_argument("--repeats", type=_positive_int, default=10, help="timed runs per measurement (median) [10]")
    p.add_argument("--warmup", type=_bounded(int, 0, False, "an integer"), default=3, help="untimed runs first [3]")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads while timing layers [1 on cpu]")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the sample [0]")
    p.add_argument("--calibration-seconds", type=_bounded(float, 0, False, "a number"), default=1.0,
                   help="measured length of each calibration run (at least 120 samples) [1.0]")
    p.add_argument("--idle-penalty", action="store_true",
                   help="CPU: also measure how much slower the network computes after its core sat idle and "
                        "charge it (Cluster.idle_penalty; off by default, see BENCHMARKS.md)")
    _pin_cores_flag(p)
    p.add_argument("--out", type=_json_path, default=None, help="write the profile here (FILE.json)")
    p.add_argument("--json", action="store_true", help="print the profile JSON on stdout")

    p = sub.add_parser("run", help="run the pipeline for real (CPU threads/processes, GPUs, torchrun) and measure it")
    p.add_argument("--network", required=True, help="catalogue name or path/to/module.py:factory (an nn.Sequential)")
    p.add_argument("--schedule", required=True, help="sequential, partime, partime-async, gpipe, 1f1b, layerpipe, zb-h1")
    p.add_argument("--devices", required=True, help="one torch device per pipeline device: cpu,cpu or cuda:0,cuda:1")
    p.add_argument("--transport", choices=("local", "distributed"), default="local",
                   help="local: threads of one process; distributed: one process per device [local]")
    p.add_argument("--samples", type=_positive_int, default=256, help="samples of the stream [256]")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--microbatches", type=_positive_int, default=None, help="microbatches per minibatch (gpipe, zb-h1)")
    p.add_argument("--stream", default=None, help="shapes, drift or shuffled:NAME [shapes for classifiers, else drift]")
    p.add_argument("--optimizer", default="sgd", help="sgd, momentum or adam [sgd]")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate [sgd 0.03, momentum 0.01, adam 1e-3]")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream and the initial weights [0]")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--partition", default="minmax", help="minmax, block, even or sizes like 4,4 [minmax]")
    p.add_argument("--compensation", default="none", help="staleness compensation: none, stash, pipemare, predict, ema")
    p.add_argument("--input-shape", type=_shape, default=None, help="one sample's shape, e.g. 3x32x32 (factories)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per worker process (distributed) [cores / processes]")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="inference on GPUs: replay each stage's forward from a captured CUDA graph")
    _pin_cores_flag(p)
    p.add_argument("--trace", type=_trace_path, default=None, help="write the measured trace (.json Perfetto, .csv)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")

    p = sub.add_parser("compare", help="predicted vs measured on this machine: profile, simulate, run, side by side")
    p.add_argument("--network", required=True, help="catalogue name or path/to/module.py:factory")
    p.add_argument("--schedule", required=True, help="sequential, partime, partime-async, gpipe, 1f1b, ...")
    p.add_argument("--devices", default="cpu,cpu", help="one torch device per pipeline device [cpu,cpu]")
    p.add_argument("--transport", choices=("local", "distributed"), default="distributed")
    p.add_argument("--samples", type=_positive_int, default=256, help="samples of the stream [256]")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--microbatches", type=_positive_int, default=None, help="microbatches per minibatch (gpipe)")
    p.add_argument("--profile", default=None, help="a saved profile (partime-sim profile --out); default: profile now")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=_positive_float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partition", default="minmax", help="minmax (on the profile), block, even or sizes")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads per worker [1]")
    p.add_argument("--no-learning", dest="learning", action="store_false",
                   help="training: skip the emulated vs measured loss curves (timing only, faster)")
    p.add_argument("--repeats", type=_positive_int, default=1,
                   help="real runs, each beside its sequential baseline run; the run of median throughput is "
                        "reported, with every run's throughput (a shared machine moves 20-30%% run to run) [1]")
    p.add_argument("--message-costs", choices=("auto", "measured", "backend"), default="auto",
                   help="per-message cost: fitted to 3 short pipedream runs of the network on this machine's "
                        "backend (CPU processes on the distributed transport; ~15 s more), the profile's measured "
                        "figure, or auto: backend where it applies and the profile is not fitted yet [auto]")
    _pin_cores_flag(p)
    p.add_argument("--out", type=Path, default=None, help="write comparison.json/.md and figures here")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("networks", help="list the built-in networks")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("schedules", help="list the schedule generators")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("clusters", help="list the cluster presets")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the main job: a what-if sweep (1 to 1024 devices), a real 2-stage CPU run "
                                    "(predicted vs measured) and a staleness study, with a report directory")
    p.add_argument("--out", type=Path, default=Path("partime-report"), help="report directory [partime-report]")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for tests, ~30 s)")

    p = sub.add_parser("paper", help="reproduce the PARTIME and LayerPipe experiments: RESULTS.md and figures")
    p.add_argument("--out", type=Path, default=None, help="output directory [the repository's paper/ folder]")
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute (for tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "poisson", False) and args.arrival_rate is None:
        parser.error("--poisson needs --arrival-rate HZ (the mean rate of the Poisson stream)")
    try:
        return COMMANDS[args.command](args)
    except PartimeError as exc:
        print(f"partime-sim: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # e.g. `partime-sim schedule ... | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C: the run's workers are already stopped
        print("partime-sim: interrupted", file=sys.stderr)
        return 130


# ---- commands --------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from partime_sim.study import StudyConfig, run_study

    result = run_study(StudyConfig.from_args(args, args.devices), progress=not args.json)
    if args.trace is not None:
        _write_trace(result.trace, args.trace)
    if args.json:
        print(json.dumps(result.summary))
    else:
        _print_table([result.summary])
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from partime_sim.study import StudyConfig, run_study

    rows = []
    for devices in tqdm(args.devices, desc="sweep", unit="config", file=sys.stderr, disable=None):
        rows.append(run_study(StudyConfig.from_args(args, devices)).summary)
    if args.plot is not None:
        from partime_sim.plots import plot_speedup

        plot_speedup(rows, args.plot)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
        if args.plot is not None:
            print(f"figure: {args.plot}")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from partime_sim.catalogue import get_network
    from partime_sim.cluster import load_cluster
    from partime_sim.partition import compare_partitioners

    network = get_network(args.network)
    rows = []
    for stages in args.devices:
        report = compare_partitioners(network, load_cluster(args.cluster, stages), stages, mode=args.mode)
        rows.append({"network": network.name, "devices": stages, **report})
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from partime_sim.generators import generate

    sched = generate(args.schedule, args.devices, args.samples, args.mode, microbatches=args.microbatches)
    sys.stdout.write(sched.validate().to_text())
    return 0


def _staleness(args: argparse.Namespace) -> int:
    from partime_sim.staleness import staleness_summary
    from partime_sim.study import resolve_schedule

    samples = args.samples if args.samples is not None else 8 * args.devices + 16
    sched = resolve_schedule(args.schedule, args.devices, samples, "train", args.microbatches)
    rows = staleness_summary(sched)
    if args.json:
        print(json.dumps({"schedule": args.schedule, "devices": args.devices, "stages": rows}))
    else:
        print(f"{sched.name} on {args.devices} devices, {sched.num_samples} samples: staleness per stage, median over "
              "its gradients (weight_delay and gradient_age in updates, signal_mismatch in samples, "
              "gradient_age_ticks in ticks)")
        _print_table(rows)
    return 0


DEFAULT_LR = {"sgd": 0.03, "momentum": 0.01, "adam": 1e-3}


def _emulate(args: argparse.Namespace) -> int:
    from partime_sim.learning import EmulateConfig, emulate, emulate_vs_sequential

    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.optimizer, 0.01)
    cfg = EmulateConfig(args.network, args.schedule, args.devices, samples=args.samples, stream=args.stream,
                        optimizer=args.optimizer, lr=lr, seed=args.seed, seeds=args.seeds, dtype=args.dtype,
                        impl=args.impl, microbatches=args.microbatches, compensation=args.compensation,
                        workers=args.workers)
    rows = emulate_vs_sequential(cfg) if args.vs_sequential else emulate(cfg)
    if args.plot is not None:
        from partime_sim.plots import plot_learning

        plot_learning(rows, args.plot)
    if args.json:
        print(json.dumps(rows))
    else:
        shown = ("schedule", "devices", "stream", "compensation", "seed", "final_loss", "mean_loss_last_10pct",
                 "online_accuracy")
        extra = ("loss_gap_last_10pct",) if args.vs_sequential else ()
        _print_table([{k: r[k] for k in shown + extra} for r in rows])
        if args.vs_sequential:
            ref = rows[0]["sequential"]
            print(f"sequential: mean_loss_last_10pct {ref['mean_loss_last_10pct']:.4g}, "
                  f"online_accuracy {_fmt(ref['online_accuracy'])}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from partime_sim.backends.run import RunConfig, run_config

    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.optimizer, 0.01)
    cfg = RunConfig(args.network, args.schedule, args.devices, transport=args.transport, samples=args.samples,
                    mode=args.mode, stream=args.stream, optimizer=args.optimizer, lr=lr, seed=args.seed,
                    dtype=args.dtype, partition=args.partition, microbatches=args.microbatches,
                    compensation=args.compensation, input_shape=args.input_shape, threads=args.threads,
                    cuda_graphs=args.cuda_graphs, pin_cores=args.pin_cores)
    row, result = run_config(cfg)
    if row is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.trace is not None:
        _write_trace(result.trace, args.trace)
    if args.json:
        print(json.dumps(row))
    else:
        shown = [k for k in row if k not in ("loss_curve", "utilization", "transfer_busy", "peak_memory_bytes")]
        _print_table([{k: row[k] for k in shown}])
    return 0


def _compare(args: argparse.Namespace) -> int:
    from partime_sim.analysis.compare import COMPARED, CompareConfig, compare, write_report

    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.optimizer, 0.01)
    cfg = CompareConfig(args.network, args.schedule, args.devices, samples=args.samples, mode=args.mode,
                        transport=args.transport, profile=args.profile, optimizer=args.optimizer, lr=lr,
                        seed=args.seed, microbatches=args.microbatches, partition=args.partition,
                        threads=args.threads, learning=args.learning, pin_cores=args.pin_cores,
                        repeats=args.repeats, message_costs=args.message_costs)
    result = compare(cfg)
    if args.out is not None:
        write_report(result, args.out)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _print_table([{"metric": k, "predicted": result.predicted.get(k), "measured": result.measured.get(k),
                       "error": result.error.get(k)} for k in COMPARED])
        runs = result.measured.get("throughput_runs_sps")
        if runs:
            print(f"measured throughput of the {len(runs)} runs: {', '.join(f'{r:.4g}' for r in runs)} samples/s "
                  f"(the median run is shown)")
        if result.learning is not None:
            print(f"learning: max |emulated - measured| per-sample loss {result.learning['max_abs_loss_diff']:.3g}")
        if args.out is not None:
            print(f"report: {args.out}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from partime_sim.backends.profiler import profile

    prof = profile(args.network, args.device.split(","), transport=args.transport, dtype=args.dtype,
                   input_shape=args.input_shape, seed=args.seed, warmup=args.warmup, repeats=args.repeats,
                   threads=args.threads, calibration_s=args.calibration_seconds, mode=args.mode,
                   pin_cores=args.pin_cores, idle_penalty=args.idle_penalty)
    if args.out is not None:
        prof.save(args.out)
    if args.json:
        print(json.dumps(prof.to_dict()))
        return 0
    cluster = prof.cluster
    _print_table([{"layer": lay.name, "kind": lay.kind, "fwd_ms": lay.fwd * 1e3, "bi_ms": lay.bwd_input * 1e3,
                   "bw_ms": lay.bwd_weight * 1e3, "opt_ms": lay.opt * 1e3, "act_bytes": lay.act_bytes}
                  for lay in prof.network.layers])
    print(f"link ({args.transport}, {cluster.num_devices} x {cluster.devices[0].kind}): {_link_text(cluster.link)}; "
          f"host link: {_link_text(cluster.host_link)}; barrier {cluster.barrier_s * 1e6:.1f} us"
          + (f" ({cluster.barrier_close_s * 1e6:.1f} us when the last two arrive within "
             f"{cluster.barrier_close_window_s * 1e6:.0f} us)" if cluster.barrier_close_window_s > 0 else ""))
    if cluster.idle_penalty:
        print("compute after an idle core takes longer by: " + ", ".join(
            f"{extra * 1e6:.0f} us after {idle * 1e6:.0f} us" for idle, extra in cluster.idle_penalty))
    if args.out is not None:
        print(f"wrote {args.out}; use it: partime-sim simulate --network {args.out} --cluster {args.out} "
              f"--schedule partime --devices {cluster.num_devices}")
    return 0


def _link_text(link: Any) -> str:
    if link.is_ideal:
        return "ideal"
    bandwidth = "inf" if link.bandwidth_Bps == float("inf") else f"{link.bandwidth_Bps / 1e9:.3g} GB/s"
    return f"latency {link.latency_s * 1e6:.1f} us, bandwidth {bandwidth}"


def _networks(args: argparse.Namespace) -> int:
    from partime_sim.catalogue import list_networks

    rows = list_networks()
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table([{k: r[k] for k in ("name", "layers", "flops", "params", "input_shape")} for r in rows])
    return 0


def _schedules(args: argparse.Namespace) -> int:
    from partime_sim.generators import SCHEDULES

    rows = [{"name": k, "description": v} for k, v in SCHEDULES.items()]
    print(json.dumps(rows)) if args.json else _print_table(rows)
    return 0


def _clusters(args: argparse.Namespace) -> int:
    from partime_sim.cluster import PRESETS

    rows = [{"name": k, "description": v} for k, v in PRESETS.items()]
    print(json.dumps(rows)) if args.json else _print_table(rows)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from partime_sim.demo import run_demo

    return run_demo(args.out, quick=args.quick)


def _paper(args: argparse.Namespace) -> int:
    from partime_sim.paper.reproduce import run_paper

    print(f"results: {run_paper(args.out, quick=args.quick)}")
    return 0


COMMANDS = {
    "simulate": _simulate,
    "sweep": _sweep,
    "partition": _partition,
    "schedule": _schedule,
    "staleness": _staleness,
    "emulate": _emulate,
    "profile": _profile,
    "run": _run,
    "compare": _compare,
    "networks": _networks,
    "schedules": _schedules,
    "clusters": _clusters,
    "demo": _demo,
    "paper": _paper,
}


# ---- output ----------------------------------------------------------------------------------


def _write_trace(trace: Any, path: Path) -> None:
    if path.suffix == ".json":
        from partime_sim.perfetto import write_chrome_trace

        write_chrome_trace(trace, path)
    else:
        trace.to_csv(path, index=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 4:
            return f"[{_fmt(min(value))}..{_fmt(max(value))}]" if all(isinstance(v, (int, float)) for v in value) else "[...]"
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return "-" if value is None else str(value)


def _print_table(rows: list[dict[str, Any]]) -> None:
    """Plain aligned table (no extra dependency); lists are shown as their range."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    sys.exit(main())
