"""The attention patch: hooks, the NABLA processor and its op, per-forward state, records, the dense fallback and the
q/k kernels. It reaches a model only through its family (family.py)."""
