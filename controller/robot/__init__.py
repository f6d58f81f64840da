"""The robot side of mu: what runs on the robot computer next to its control loop.

`client.PolicyClient` (the gRPC lane), `local.LocalClient` (the local lane, with its policy
watcher and experience queue), `realtime` (real-time hygiene for a Python loop),
the loop engine (`engine.run_loop`) with its plants (`plants`) and report (`report`), `loop`
(`mu loop`) and `demo` (`make demo`). The server side (controller/*.py, finetune/) never
imports this package, and this package never imports finetune/; both sides run the tick in
controller/pipeline.py.
"""
