"""Gradient steps per second of V2A's trajectory-encoder stage (algos/v2a.py, stage 1/4) at its default sizes, and the
operations of its compiled step: the GRU runs sequentially over each 200-step window, so its per-time-step work sets
the stage's speed (benchmarks/speed.py times v2a's last stage, not this one).

    python benchmarks/encoder_speed.py                       # defaults of algos/v2a.py, HalfCheetah's shapes
    python benchmarks/encoder_speed.py --steps 20 --chunks 2 # a quick look

The stage's own make_encoder_train (encoder step, then decoder step, windows sampled from the data) runs on synthetic
trajectories (values do not change speed), one seed, jit as the stage compiles it: one chunk warms up, --chunks are
timed; steps/s is --steps over the median chunk. Ops: the instructions of the bodies of the loops over the window's
time steps (the GRU's recurrence, forward and backward, in the encoder and the decoder steps), counted as
benchmarks/speed.py counts a training step's (step_ops). Prints one markdown
row; --out appends it to a markdown file.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import device_name, step_ops  # noqa: E402


def load_v2a():
    spec = importlib.util.spec_from_file_location("encoder_speed_v2a", ROOT / "algos" / "v2a.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="gradient steps of a timed chunk")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks (after one warm-up chunk)")
    parser.add_argument("--obs-dim", type=int, default=17)
    parser.add_argument("--act-dim", type=int, default=6)
    parser.add_argument("--label", default="", help="a word for the row (e.g. the commit)")
    parser.add_argument("--out", type=Path, help="a markdown file the row is appended to")
    options = parser.parse_args(argv)
    if options.steps < 1 or options.chunks < 1:
        raise SystemExit("--steps and --chunks must be at least 1.")

    v2a = load_v2a()
    args = v2a.Args()
    init, train = v2a.make_encoder_train(args.gru_hidden, args.z_dim, tuple(args.hidden), args.ensemble_size,
                                         args.kl_weight, args.lr, args.grad_clip,
                                         args.encoder_batch_size, args.window, options.obs_dim, options.act_dim)
    lengths = np.full(50, 1000)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    steps = np.random.default_rng(0).normal(size=(int(lengths.sum()), 2 * options.obs_dim + options.act_dim))
    data = jax.device_put(v2a.EncoderData(jnp.asarray(steps, jnp.float32), jnp.asarray(starts),
                                          jnp.asarray(lengths, jnp.int32)))

    start = time.perf_counter()
    runner = jax.block_until_ready(jax.jit(init)(jax.random.PRNGKey(0)))
    compiled = jax.jit(partial(train, num_steps=options.steps)).lower(runner, data).compile()
    compile_seconds = time.perf_counter() - start
    ops = step_ops(compiled.as_text(), args.window, every=True)
    runner, _ = jax.block_until_ready(compiled(runner, data))
    seconds = []
    for _ in range(options.chunks):
        start = time.perf_counter()
        runner, metrics = jax.block_until_ready(compiled(runner, data))
        seconds.append(time.perf_counter() - start)
    rate = options.steps / float(np.median(seconds))
    op_list = ", ".join(f"{op} {count}" for op, count in ops.items())
    row = (f"| {options.label} | {device_name()} | {args.gru_hidden} | {args.window} | {args.encoder_batch_size} | "
           f"{rate:.2f} | {compile_seconds:.1f} | {sum(ops.values())} ({op_list}) |")
    print("| label | device | GRU hidden | window | batch | encoder steps/s | compile s | ops per time step |")
    print("|---|---|---|---|---|---|---|---|")
    print(row)
    print(f"chunk seconds {', '.join(f'{s:.2f}' for s in seconds)}; loss {float(metrics['loss']):.4f}")
    if options.out:
        with open(options.out, "a") as file:
            file.write(row + "\n")


if __name__ == "__main__":
    main()
