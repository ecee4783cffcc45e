"""Generated protobuf and gRPC code for proto/kvroute/v1 (see generate.py)."""
