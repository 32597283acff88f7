"""The oracle kit, one module per variant; :mod:`lora_ref.testing` re-exports its public names and
states the calling convention every check shares.

core.py (tolerances, results, reports, calls), linear.py (plain LoRA, rsLoRA, fused projections),
dora.py, embedding.py, conv.py, adapters.py (adapter sets and mixed batches), serving.py (shrink,
expand, a whole serving step), combine.py (adapter combinations), quant.py (4-bit quantisation,
bit for bit); golden.py (the golden cases of :mod:`lora_ref.vectors`, built from the same calls);
mutants.py (the registry of wrong implementations each check must fail), with their code in
wrong.py and wrong_many.py.
"""
