"""The runtime inside a model service: one model, its KV cache, precision and sampling (torch; no gRPC)."""
