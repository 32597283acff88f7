"""Milliseconds per training step of ``transformer_ref.train``: ``python -m benchmarks.step``.

    python -m benchmarks.step                          # LoRA on q, v of a 128-wide, 4-layer GPT-2
    python -m benchmarks.step --n-embd 512 --n-layer 6 --seq 128 --batch 8 --matrices q,v

It calls ``transformer_ref.train`` itself -- the loop users call, with its defaults (op set
``FAST``, ``threads=None``: ``auto_threads``; glibc keeping freed memory) -- on the same random
batch every step, and times each step from one batch request to the next
(``benchmarks.ref_gpt2.time_train``). One process, one library: the comparison with PyTorch is
``python -m benchmarks.run`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, time the steps, print one line; returns the exit status."""
    from transformer_ref import GPTConfig, REFERENCE, add_adapters, init_params, lora_config_for
    from transformer_ref.fast import auto_threads

    from .ref_gpt2 import time_train

    ap = argparse.ArgumentParser(prog="python -m benchmarks.step",
                                 description="Time transformer_ref.train's steps on a fixed random batch.")
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
    ap.add_argument("--reference", action="store_true", help="train(..., ops=REFERENCE): the paper's order")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="train()'s threads: batch slices computed in parallel (default None: auto_threads)")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error(f"--warmup must be >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
    config = GPTConfig(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                       n_head=args.n_head)
    params = init_params(config, 0, args.dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, size=(args.batch, args.seq))       # (B, T)
    targets = rng.integers(0, args.vocab, size=(args.batch, args.seq))      # (B, T)
    kwargs = {"mode": args.mode, "threads": args.threads}
    if args.reference:
        kwargs["ops"] = REFERENCE
    if args.mode == "lora":
        lc = lora_config_for(args.matrices.split(","), r=args.rank, alpha=16.0)
        kwargs.update(lora_config=lc, adapters=add_adapters(params, config, lc, rng))
    seconds, _ = time_train(params, config, tokens, targets, args.warmup + args.steps, **kwargs)
    ms = [1e3 * t for t in seconds[args.warmup:]]
    slices = auto_threads(config, tokens.shape) if args.threads is None else args.threads
    print(f"{args.mode} step, {args.dtype}, n_embd={args.n_embd} n_layer={args.n_layer} n_head={args.n_head} "
          f"T={args.seq} batch={args.batch} vocab={args.vocab} r={args.rank} on {args.matrices}, "
          f"ops={'REFERENCE' if args.reference else 'FAST'}: "
          f"median {statistics.median(ms):.2f} ms (min {min(ms):.2f}, max {max(ms):.2f}, {len(ms)} steps "
          f"after {args.warmup} warm-up; transformer_ref.train, {slices} batch slice(s) in parallel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
