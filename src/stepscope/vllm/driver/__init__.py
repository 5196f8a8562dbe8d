"""stepscope's own driver of vLLM engines, in the user's process: prompts, sampling parameters and stats
collection (`client.py`), the trace runner with budget forcing (`runner.py`), and the engines and data-parallel
pools of `--engine vllm` (`engine.py`). It imports the plugin (stepscope.vllm.plugin), never the reverse."""
