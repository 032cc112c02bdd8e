"""Hand-computed PARTIME with S = 2 linear stages o = w1 * (w0 * x) and MSE, in exact
fractions: the reference both the emulator and the 'stash' compensation tests compare with."""

from fractions import Fraction


def partime_two_linear_stages(xs, ys, lr, w0, w1, *, stash_input=False):
    """Tick t: stage 0 runs F on x_t and, from tick 2, B with the input gradient stage 1 made at
    tick t-1 (sample t-2's) on x_t, or on x_{t-2} when ``stash_input`` (the 'stash' rule: the
    signal meets its own forward; d/dw0 of w0*x does not depend on w0, only the input moves).
    Stage 1 runs F and B on sample t-1. Both update at the end of the tick.
    Returns (per-sample losses, final w0, final w1)."""
    n, stages = len(xs), 2
    act, grad_in, losses = {}, {}, {}
    w0, w1 = Fraction(w0), Fraction(w1)
    for t in range(n + stages - 1):
        new_w0, new_w1 = w0, w1
        if t < n:
            act[t] = w0 * xs[t]
            if t >= 2:  # first tick a real gradient reaches stage 0: 2S-2-0
                new_w0 = w0 - lr * grad_in[t - 1] * xs[t - 2 if stash_input else t]
        m = t - 1
        if 0 <= m < n:
            o = w1 * act[m]
            losses[m] = (o - ys[m]) ** 2
            g = 2 * (o - ys[m])
            grad_in[t] = g * w1
            new_w1 = w1 - lr * g * act[m]
        w0, w1 = new_w0, new_w1
    return [losses[m] for m in range(n)], w0, w1
