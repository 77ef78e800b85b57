"""Generated protobuf and gRPC modules for kvstore.v1 (built from proto/ by setup.py, not committed)."""
