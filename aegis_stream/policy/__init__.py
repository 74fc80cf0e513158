"""Policy: the model (model.py), its compiler to kernel entries (compiler.py)."""
