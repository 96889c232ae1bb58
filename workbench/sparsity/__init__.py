"""Activation sparsity: the rules (`rules`), the calibration artifact (`calibration`), the calibration
procedure (`calibrate`) and TEAL's greedy allocation (`greedy`). Its GPU kernels live in `workbench.kernels`
(`sparse_gemv`, `topk`, `decode_ops`), beside the other kernels they share a tuner with."""
