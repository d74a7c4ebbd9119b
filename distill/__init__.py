"""Distillation: the KD loss on cached top-k logits, resumable checkpoints, the training loop."""
