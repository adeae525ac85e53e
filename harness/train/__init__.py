"""Training: the one loop for every world size, optimisers, checkpoints, torch.distributed."""
