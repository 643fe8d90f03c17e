"""Gradient steps per second of V2A's trajectory-encoder stage (algos/v2a.py, stage 1/4) at its default sizes, and the
operations of its compiled step: the GRU runs sequentially over each 200-step window, so its per-time-step work sets
the stage's speed (benchmarks/speed.py times v2a's last stage, not this one).

    python benchmarks/encoder_speed.py                       # the fused GRU, v2a.py's defaults, HalfCheetah's shapes
    python benchmarks/encoder_speed.py --steps 20 --chunks 2 # a quick look
    python benchmarks/encoder_speed.py --encoder both        # the fused GRU and flax's GRUCell, one after the other

v2a.py's TrajectoryEncoder has both forms of the same GRU (its `fused` field; by default fused except on a CPU).
The stage's own make_encoder_train (encoder step, then decoder step, windows sampled from the data) runs on synthetic
trajectories (values do not change speed), one seed, jit as the stage compiles it: one chunk warms up, --chunks are
timed; steps/s is --steps over the median chunk. Ops: the instructions of the bodies of the loops over the window's
time steps (the GRU's recurrence, forward and backward, in the encoder and the decoder steps), counted as
benchmarks/speed.py counts a training step's (step_ops). Prints a markdown row
per encoder; --out appends them to a markdown file.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.speed import device_name, step_ops  # noqa: E402
from envs.run import load_script  # noqa: E402


def load_v2a():
    return load_script("v2a", "encoder_speed_v2a")


ENCODERS = ("fused", "flax-grucell")


def measure(encoder: str = "fused", steps: int = 100, chunks: int = 3, obs_dim: int = 17, act_dim: int = 6,
            sizes: dict = None) -> dict:
    """Encoder-stage steps/s with v2a.py's fused encoder or its flax GRUCell one (TrajectoryEncoder's `fused`), at
    v2a.py's default sizes (or `sizes`: gru_hidden, z_dim, window, encoder_batch_size, hidden overrides)."""
    v2a = load_v2a()  # make_encoder_train and its loss build the encoder from the module's name
    v2a.TrajectoryEncoder = partial(v2a.TrajectoryEncoder, fused=encoder == "fused")
    args = v2a.Args(**(sizes or {}))
    init, train = v2a.make_encoder_train(args.gru_hidden, args.z_dim, tuple(args.hidden), args.ensemble_size,
                                         args.kl_weight, args.lr, args.grad_clip, args.encoder_batch_size,
                                         args.window, obs_dim, act_dim)
    lengths = np.full(50, max(args.window, 20) * 5)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    data = np.random.default_rng(0).normal(size=(int(lengths.sum()), 2 * obs_dim + act_dim))
    data = jax.device_put(v2a.EncoderData(jnp.asarray(data, jnp.float32), jnp.asarray(starts),
                                          jnp.asarray(lengths, jnp.int32)))

    start = time.perf_counter()
    runner = jax.block_until_ready(jax.jit(init)(jax.random.PRNGKey(0)))
    compiled = jax.jit(partial(train, num_steps=steps)).lower(runner, data).compile()
    compile_seconds = time.perf_counter() - start
    ops = step_ops(compiled.as_text(), args.window, every=True)
    runner, _ = jax.block_until_ready(compiled(runner, data))
    seconds = []
    for _ in range(chunks):
        start = time.perf_counter()
        runner, metrics = jax.block_until_ready(compiled(runner, data))
        seconds.append(time.perf_counter() - start)
    return {"encoder": encoder, "device": device_name(), "gru_hidden": args.gru_hidden, "window": args.window,
            "batch_size": args.encoder_batch_size, "steps_per_second": steps / float(np.median(seconds)),
            "chunk_seconds": seconds, "compile_seconds": compile_seconds, "ops_per_time_step": sum(ops.values()),
            "ops": ops, "loss": float(metrics["loss"])}


def row(label: str, result: dict) -> str:
    op_list = ", ".join(f"{op} {count}" for op, count in result["ops"].items())
    return (f"| {label} | {result['device']} | {result['gru_hidden']} | {result['window']} | {result['batch_size']} | "
            f"{result['steps_per_second']:.2f} | {result['compile_seconds']:.1f} | {result['ops_per_time_step']} "
            f"({op_list}) |")


HEADER = ("| label | device | GRU hidden | window | batch | encoder steps/s | compile s | ops per time step |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", choices=(*ENCODERS, "both"), default="fused",
                        help="v2a.py's fused GRU, its flax GRUCell one, or both one after the other")
    parser.add_argument("--steps", type=int, default=100, help="gradient steps of a timed chunk")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks (after one warm-up chunk)")
    parser.add_argument("--obs-dim", type=int, default=17)
    parser.add_argument("--act-dim", type=int, default=6)
    parser.add_argument("--label", default="", help="a word for the rows (e.g. the commit); the encoder is added")
    parser.add_argument("--out", type=Path, help="a markdown file the rows are appended to")
    options = parser.parse_args(argv)
    if options.steps < 1 or options.chunks < 1:
        raise SystemExit("--steps and --chunks must be at least 1.")
    print(HEADER)
    for encoder in ENCODERS if options.encoder == "both" else (options.encoder,):
        result = measure(encoder, options.steps, options.chunks, options.obs_dim, options.act_dim)
        line = row(" ".join(filter(None, (options.label, encoder))), result)
        print(line)
        print(f"chunk seconds {', '.join(f'{s:.2f}' for s in result['chunk_seconds'])}; loss {result['loss']:.4f}")
        if options.out:
            with open(options.out, "a") as file:
                file.write(line + "\n")


if __name__ == "__main__":
    main()
