"""Post-training pruning of heads and FFN filters (Kwon et al. 2022), one pipeline for both families.

pipeline.py runs the stages (calibrate, score, search, rearrange, tune, slim, save); config.py holds the
one settings dataclass; encoder.py and decoder.py say what each stage does for a family; stages.py what
the stages hand each other; summary.py the record and the summary. The stages' parts: fisher.py and
lm_scores.py (mask gradients), baselines.py, cost.py / decoder_cost.py / latency.py (cost models),
search.py and gqa.py (mask search), rearrange.py, tune.py / tune_layerwise.py / lstsq.py (least-squares
tuning), slim.py (cutting pruned units out of the weights).
"""
