"""Weight formats: quantize / pack / dequantize (`quant`), the registered formats and their packed storage
(`packed`), per-module sensitivity scans (`sensitivity`) and mixed precision under a budget
(`mixed_precision`). Their GPU kernels live in `workbench.kernels` (`quant_gemv`)."""
