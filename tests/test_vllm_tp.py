"""StepFlow inside vLLM with tensor parallelism: 3 ranks (6 heads, 3 KV heads: one KV head and two query heads
each) on a tiny random Llama, exact against the transformers path as TP=1 is (tests/test_vllm_tiny_llama.py).

Each rank recomputes its own heads from its own cache shard; `collect_stats` sums the OEB counts of the ranks.
So the teacher-forced argmax and logprobs, the runner's traces (greedy, budget-forced, both arms) and the
fire counts equal the transformers engine's, as at TP=1: TP=3 equals TP=1. One engine (four processes on the
CPU); SmolLM2 at TP=3 (30 layers, two all-reduces each per token) costs too much on a small shared CPU.
"""

import os

import pytest
from conftest import require_vllm

require_vllm()

from test_vllm_tiny_llama import CFG, assert_matches_teacher_forced, assert_runner_matches  # noqa: E402
from tiny import make_model, make_tokenizer, peaked  # noqa: E402

TP = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # more ranks than NUMA nodes
    from vllm import LLM

    path = tmp_path_factory.mktemp("tiny_llama_tp")
    model = peaked(make_model("llama", hidden_size=192, intermediate_size=384, head_dim=32, num_attention_heads=6,
                              num_key_value_heads=3, layers=4, seed=2))
    tok = make_tokenizer("think")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0,
              tensor_parallel_size=TP)
    yield llm, model, tok
    del llm


def test_tp3_matches_teacher_forced_transformers(setup):
    llm, model, tok = setup
    assert_matches_teacher_forced(llm, model, tok, "tp", lambda i: 16 + 4 * i)


@pytest.mark.parametrize("stepflow", [None, CFG], ids=["plain", "stepflow"])
def test_tp3_runner_writes_the_transformers_engines_traces(setup, stepflow):
    llm, model, tok = setup
    assert_runner_matches(llm, model, tok, stepflow, max_new_tokens=16, max_thinking_tokens=5)
