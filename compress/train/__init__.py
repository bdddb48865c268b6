"""Fine-tuning (finetune.py; SQuAD spans in qa.py) and dev-set evaluation (evaluate.py) of encoders."""
