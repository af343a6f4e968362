"""An OpenAI-compatible HTTP front: a FastAPI app that speaks to the router over its gRPC API."""
