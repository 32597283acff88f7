"""Benchmarks: lora-ref against PyTorch + PEFT and against the machine's own matmul rate.

Run ``python -m benchmarks.run [--quick]``: it writes ``benchmarks/results/<cpu-kind>.json`` (a
quick run: ``benchmarks/results/quick/<cpu-kind>.json``) and regenerates ``docs/performance.md``
and ``docs/performance.png`` from every results file. Nothing here is imported by the library or
by the test suite (except the smoke test, which runs a tiny configuration).

Modules
-------
run          the entry point: the peaks, the training rounds, the other measurements, the page
rounds       the comparison between libraries: fresh processes, rotating rounds, per-round ratios
worker       ``python -m benchmarks.worker``: one measurement in a fresh interpreter, JSON out
harness      timing within one process, machine facts (CPU model and kind, BLAS kernel), matmul rate
flops        the step's floating-point operations and bytes, counted analytically
ref_gpt2     the lora-ref side: the model, and ``transformer_ref.train`` timed step by step
torch_gpt2   the PyTorch side: transformers GPT-2 + PEFT LoRA, eager or ``torch.compile``, CPU
suites       the lora-ref-only measurements (inference, memory, backends, profile, delta_svd)
breakdown    a step's time per layer, from a timed copy of the op set, against the matmul limit
             (``python -m benchmarks.breakdown``)
step         ``python -m benchmarks.step``: milliseconds per ``train()`` step, one line
report       benchmarks/results/*.json -> docs/performance.md (tables) and docs/performance.png
"""
