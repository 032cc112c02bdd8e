"""Benchmark: the JAX emulator against the torch reference on the same run (samples/s), and a
`vmap` sweep of 8 learning rates against 8 separate JAX runs (goal: the sweep costs less than
3 separate runs), and against the same 8 runs side by side, one per core (what a user with
several cores could do without the sweep). Compile time is reported apart from run time.

The floor under that ratio is measured too: the bare arithmetic (a plain SGD step of the whole
network per sample, no pipeline, ``vmap``-ed over C sets of weights) for C = 1 and 8. Each
configuration has its own weights, so nothing of it is shared: on one core the sweep can only
amortise what the emulator spends per sample beyond the arithmetic; the rest of its gain comes
from running its chunks of configurations on every core.

Run: python benchmarks/bench_emulators.py [--quick]   (prints Markdown for BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

from partime_sim.generators import generate
from partime_sim.models import build_torch_model, input_shape, num_outputs, split_stages, stage_to_jax
from partime_sim.optimizers import OptimizerSpec
from partime_sim.partition import even_partition
from partime_sim.streams import make_stream


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def bare_step_seconds(jax_stages: list, x, y, configs: int) -> float:
    """Seconds of a compiled scan of plain SGD steps of the whole network over the stream,
    ``vmap``-ed over ``configs`` copies of the weights (median of 5 calls)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    applies = [fn for _, fn in jax_stages]

    def loss(params, xm, ym):
        out = xm[None]
        for fn, p in zip(applies, params):
            out = fn(p, out)
        return -jax.nn.log_softmax(out.reshape(-1))[ym]

    def step(params, xy):
        grads = jax.grad(loss)(params, *xy)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), None

    params = [jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * configs), p) for p, _ in jax_stages]
    run = jax.jit(lambda ps: lax.scan(jax.vmap(step, in_axes=(0, None)), ps, (jnp.asarray(x), jnp.asarray(y)))[0])
    jax.block_until_ready(run(params))
    times = [timed(lambda: jax.block_until_ready(run(params)))[0] for _ in range(5)]
    return statistics.median(times)


def main() -> None:
    from partime_sim.emulator_jax import _config_chunks, emulate_jax, emulate_jax_sweep
    from partime_sim.emulator_torch import emulate_torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    samples, stages, net = (200 if args.quick else 2000), 4, "mlp"
    stream = make_stream("shapes", samples, input_shape(net), num_outputs(net), 0)
    sched = generate("partime", stages, samples, "train")
    torch_stages = split_stages(build_torch_model(net, 0), even_partition(8, stages))
    jax_stages = stage_to_jax(torch_stages)
    spec = OptimizerSpec("sgd", lr=0.03)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"date {date.today()}\n")
    print(f"partime, S={stages}, {net}, {samples} samples of 'shapes', SGD, float32.\n")
    t_torch, _ = timed(lambda: emulate_torch(sched, torch_stages, stream.x, stream.y, optimizer=spec,
                                             dtype="float32"))
    t_first, _ = timed(lambda: emulate_jax(sched, jax_stages, stream.x, stream.y, optimizer=spec))
    t_jax, _ = timed(lambda: emulate_jax(sched, jax_stages, stream.x, stream.y, optimizer=spec))
    print("| run | seconds | samples/s |\n|---|---|---|")
    print(f"| torch reference | {t_torch:.2f} | {samples / t_torch:,.0f} |")
    print(f"| JAX, first call (compile + run) | {t_first:.2f} | {samples / t_first:,.0f} |")
    print(f"| JAX, compiled | {t_jax:.2f} | {samples / t_jax:,.0f} |")
    specs = [OptimizerSpec("sgd", lr=0.005 * (i + 1)) for i in range(8)]
    sweep = lambda: emulate_jax_sweep(sched, jax_stages, stream.x, stream.y, optimizer=specs)
    run_one = lambda s: emulate_jax(sched, jax_stages, stream.x, stream.y, optimizer=s)
    eight = lambda: [run_one(s) for s in specs]
    cores = len(os.sched_getaffinity(0))

    def eight_side_by_side():  # the fair baseline on a multi-core CPU: separate runs, one per core at a time
        with ThreadPoolExecutor(cores) as pool:
            return list(pool.map(run_one, specs))

    sweep(), eight_side_by_side()  # compile
    # interleaved repeats, medians: one run's time moves 0.10-0.16 s here with the thread pool's wake-ups
    rounds = [(timed(sweep)[0], timed(eight)[0], timed(eight_side_by_side)[0]) for _ in range(3 if args.quick else 7)]
    ratios = sorted(8 * ts / te for ts, te, _ in rounds)
    t_sweep, t_eight, t_side = (statistics.median(r[i] for r in rounds) for i in range(3))
    print(f"\n{len(rounds)} interleaved repeats, medians; the ratio's range over the repeats in brackets. "
          f"The sweep runs its configurations in {len(_config_chunks(len(specs)))} chunks side by side, "
          "one per core.\n")
    print("| 8 learning rates | seconds | in separate runs |\n|---|---|---|")
    print(f"| vmap sweep (compiled) | {t_sweep:.2f} | **{statistics.median(ratios):.2f}** "
          f"[{ratios[0]:.2f}-{ratios[-1]:.2f}] |")
    print(f"| 8 separate runs (compiled), one after another | {t_eight:.2f} | 8 |")
    print(f"| 8 separate runs (compiled), {cores} at a time in threads | {t_side:.2f} | "
          f"{8 * t_side / t_eight:.2f} |")
    one, eight_bare = (bare_step_seconds(jax_stages, stream.x[:samples], stream.y[:samples], c) for c in (1, 8))
    print("\nThe floor on one core: plain SGD steps of the whole network (no pipeline), `vmap`-ed over C weight "
          "sets in one call.\n")
    print("| bare arithmetic | seconds | us per sample |\n|---|---|---|")
    print(f"| C = 1 | {one:.3f} | {one / samples * 1e6:.1f} |")
    print(f"| C = 8 | {eight_bare:.3f} | {eight_bare / samples * 1e6:.1f} (**{eight_bare / one:.2f}** x C = 1) |")


if __name__ == "__main__":
    main()
