"""The generated protobuf and gRPC modules of kvstore.v1.

protoc writes them into ``kvstore/v1/`` (the proto's package path, see
setup.py); the server and the SDK import them from here, so that this is the
one module that names the generated package.
"""

from kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

__all__ = ["kvstore_pb2", "kvstore_pb2_grpc"]
