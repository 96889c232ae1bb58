"""Sparse attention: key selectors (`selectors`), the transformers backend that applies them per layer
(`backend`, `install`), capture for the attention views (`capture`), the needle-in-a-haystack probe
(`needle`), and the torch reference of the block-sparse decode kernel (`block_sparse`)."""
