"""Where models come from: the embedded default pair, GGUF conversion and the local cache."""
