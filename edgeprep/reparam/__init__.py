"""Re-parameterization (SLAB): PRepBN norms that fold away at export, Simplified Linear Attention.

``norms`` (RepBN / PRepBN modules and their lam schedule), ``sla`` (the attention),
``surgery`` (swapping them into a model; decisions and replay), ``fold`` (folding for export).
"""
