"""The kvroute.v1 wire API: generated protobuf/gRPC code (``pb``), model <-> message
conversion (``convert``) and the transport settings both ends share (``channel``)."""
