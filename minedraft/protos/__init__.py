"""Generated gRPC stubs (built from proto/ at install time, never committed)."""
