"""One module per importance method, each declaring a `SPEC` (see spec.py).

The list of methods lives in prune_core/importance/registry.py and nowhere else; adding a method
is one module here plus its name there.
"""
