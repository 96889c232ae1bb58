"""Export the engine's model under its policy to the formats serving engines load: GGUF (`export.gguf`,
llama.cpp) and compressed-tensors (`export.compressed_tensors`, vLLM). Each writes, and each has a check
that reads the export back with an independent reader and scores it against the engine."""
from workbench.export.compressed_tensors import check_compressed_tensors, export_compressed_tensors
from workbench.export.gguf import check_gguf, export_gguf

EXPORTERS = {"gguf": (export_gguf, check_gguf),
             "compressed-tensors": (export_compressed_tensors, check_compressed_tensors)}
