"""Milliseconds per training step of transformer_ref: ``python -m benchmarks.step``.

    python -m benchmarks.step                          # LoRA on q, v of a 128-wide, 4-layer GPT-2
    python -m benchmarks.step --n-embd 512 --n-layer 6 --seq 128 --batch 8 --matrices q,v

Each step is what ``transformer_ref.train`` runs: the loss with the training op set
``transformer_ref.FAST``, its value and gradient on ``threads`` slices of the batch at once
(``transformer_ref.fast.sharded_value_and_grad``; default ``auto_threads``, as ``train()``
chooses), then ``adam_update``, on random tokens. By default it first calls
``transformer_ref.machine.keep_freed_memory()`` (``--default-malloc`` leaves glibc alone). The
comparison with PyTorch is ``python -m benchmarks.run`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, time the steps, print one line; returns the exit status."""
    from lora_ref.backend import asarray
    from transformer_ref import FAST, GPTConfig, add_adapters, init_params, lora_config_for, loss
    from transformer_ref.fast import auto_threads, sharded_value_and_grad
    from transformer_ref.machine import keep_freed_memory
    from transformer_ref.train import adam_init, adam_update

    ap = argparse.ArgumentParser(prog="python -m benchmarks.step",
                                 description="Time training steps (value_and_grad + Adam) on random tokens.")
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64, help="T")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--matrices", default="q,v", help="comma-separated subset of q,k,v,o,mlp_in,mlp_out")
    ap.add_argument("--mode", choices=("lora", "full"), default="lora")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc settings alone (by default keep_freed_memory() is called)")
    ap.add_argument("--threads", type=int, default=None,
                    help="batch slices computed in parallel (default: auto_threads, as train() chooses)")
    args = ap.parse_args(argv)
    tuned = False if args.default_malloc else keep_freed_memory()
    config = GPTConfig(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                       n_head=args.n_head)
    params = init_params(config, 0, args.dtype)
    lc = lora_config_for(args.matrices.split(","), r=args.rank, alpha=16.0)
    rng = np.random.default_rng(0)
    trainable = add_adapters(params, config, lc, rng) if args.mode == "lora" else params
    if args.mode == "lora":
        objective = lambda ad, x, y, masks=None: loss(params, x, y, config, ad, lc, ops=FAST)  # noqa: E731
    else:
        objective = lambda p, x, y, masks=None: loss(p, x, y, config, ops=FAST)  # noqa: E731
    threads = auto_threads(config, (args.batch, args.seq)) if args.threads is None else args.threads
    f = sharded_value_and_grad(objective, threads)
    state = adam_init(trainable)
    times = []
    for i in range(args.warmup + args.steps):
        x = asarray(rng.integers(0, args.vocab, size=(args.batch, args.seq)))
        y = asarray(rng.integers(0, args.vocab, size=(args.batch, args.seq)))
        t0 = time.perf_counter()
        value, grads = f(trainable, x, y)
        trainable, state = adam_update(trainable, grads, state, lr=1e-3)
        float(value)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = [1e3 * t for t in times]
    print(f"{args.mode} step, {args.dtype}, n_embd={args.n_embd} n_layer={args.n_layer} n_head={args.n_head} "
          f"T={args.seq} batch={args.batch} vocab={args.vocab} r={args.rank} on {args.matrices}: "
          f"median {statistics.median(ms):.2f} ms (min {min(ms):.2f}, max {max(ms):.2f}, {len(ms)} steps "
          f"after {args.warmup} warm-up; keep_freed_memory: {tuned}; {threads} batch slice(s) in parallel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
