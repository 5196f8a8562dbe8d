"""What vLLM loads inside its own processes (front end, engine core, every worker): the general plugin
(`register.register`), the logits processor (`processor.StepFlowLogitsProcessor`), the attention backends
(`backend*.py`), the worker's per-request state (`worker.WORKER`), one layer's repair (`layer.py`) over the paged
cache (`paged.py`), what a request asks for (`requests.py`) and the stats its workers report (`stats.py`,
`stats_file.py`).

Nothing here imports stepscope's driver (stepscope.vllm.driver). This file imports nothing, so that the user's
process can read `requests` and `stats_file` without loading vLLM.
"""
