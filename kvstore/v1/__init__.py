"""Generated protobuf and gRPC modules for kvstore.v1.

Built from proto/ by setup.py at install time; never committed.
"""
