"""Sparse attention: key selectors (`selectors`), the transformers backend that applies them per layer
(`backend`, `install`), capture for the attention views (`capture`), and the torch reference of the
block-sparse decode kernel (`block_sparse`)."""
