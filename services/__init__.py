"""minedraft's three gRPC services: draft, target and router."""
