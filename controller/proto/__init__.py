"""Generated gRPC code for protos/mu/v1 (do not edit; run protos/generate.py)."""
