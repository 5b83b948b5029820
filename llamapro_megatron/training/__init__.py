"""The trainer: post-pretrain the expanded blocks of a LLaMA Pro checkpoint (see trainer.py)."""
