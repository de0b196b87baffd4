"""Writing quantized models: compressed-tensors pack-quantized checkpoints."""
