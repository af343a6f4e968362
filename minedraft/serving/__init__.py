"""gRPC plumbing shared by the services: server life cycle, servicer helpers, security, tracing."""
