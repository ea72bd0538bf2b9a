"""Distributed training: the Ray Train worker loop (DeepSpeed), the TorchTrainer launcher, checkpoints."""
