"""Benchmarks: lora-ref against PyTorch + PEFT and against the machine's own matmul peak.

Run ``python -m benchmarks.run [--quick]``: it writes ``benchmarks/results.json`` and regenerates
``docs/performance.md`` and ``docs/performance.png``. Nothing here is imported by the library or
by the test suite (except the smoke test, which runs one tiny configuration).

Modules
-------
harness      timing (medians of alternated runs), machine facts, BLAS thread counts, matmul peak
flops        the step's floating-point operations and bytes, counted analytically
torch_gpt2   the PyTorch side: transformers GPT-2 + PEFT LoRA, eager, CPU
ref_gpt2     the lora-ref side: transformer_ref's model (op set FAST, as train() uses) and Adam
breakdown    a step's time per layer, from a timed copy of the op set
step         ``python -m benchmarks.step``: milliseconds per training step, one line
suites       one function per measurement (training step, inference, memory, backends, ...)
report       results.json -> docs/performance.md (tables) and docs/performance.png (plot)
run          the entry point
"""
