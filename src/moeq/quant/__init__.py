"""Integer grids: quantization arguments and pure quantize/dequantize primitives."""
