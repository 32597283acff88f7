"""The oracle kit, one module per variant; :mod:`lora_ref.testing` re-exports its public names.

core.py (tolerances, results, reports, calls), linear.py (plain LoRA, rsLoRA, fused projections),
dora.py, embedding.py, conv.py, adapters.py (adapter sets and mixed batches), serving.py (shrink,
expand, a whole serving step), combine.py (adapter combinations), quant.py (4-bit quantisation),
mutants.py (wrong implementations each check must fail). Read :mod:`lora_ref.testing` first: it
states the calling convention every check shares.
"""
