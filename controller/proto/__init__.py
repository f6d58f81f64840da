"""Generated gRPC code for protos/mu/v1 and protos/inference (do not edit; run protos/generate.py)."""
