"""Export the engine's model under its policy to the formats serving engines load (`export.gguf`)."""
