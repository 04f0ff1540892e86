"""Serving a trained policy to robots and simulators in other processes.

`server` loads a run checkpoint or an export and answers two wire protocols on one port:
openpi's websocket policy protocol (`wire`: msgpack with numpy arrays) and OpenVLA's
`POST /act` REST endpoint (json-numpy). `inputs` turns either request into one `Query`
(checked image, prompt, state); `batcher` gathers the queries of concurrent clients into
batches for one policy call on a worker thread, so the event loop never blocks.
"""
