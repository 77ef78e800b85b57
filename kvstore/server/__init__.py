"""The gRPC edge: protobuf <-> domain conversion, error mapping, the server."""
