"""Data: the tasks (GLUE, BBC News, SQuAD) and their splits, calibration text, batching, the official
metrics (GLUE, SQuAD EM/F1) and perplexity on held-out text. The data directory is resolved in datadir.py."""
