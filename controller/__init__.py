"""The control service: policy loading, gRPC server, safety limits and client.

Serving imports onnxruntime, grpcio, protobuf and numpy only, never torch.
"""
