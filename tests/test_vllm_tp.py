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

from test_vllm_server import wait_for_stats  # noqa: E402
from test_vllm_tiny_llama import CFG, QUESTIONS, assert_matches_teacher_forced, assert_runner_matches  # noqa: E402
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
    stats = path / "stats.jsonl"
    os.environ["STEPSCOPE_STATS_FILE"] = str(stats)  # the engine's processes inherit it
    try:
        llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0,
                  tensor_parallel_size=TP)
    finally:
        del os.environ["STEPSCOPE_STATS_FILE"]
    yield llm, model, tok, stats
    del llm


def test_tp3_matches_teacher_forced_transformers(setup):
    llm, model, tok, _ = setup
    assert_matches_teacher_forced(llm, model, tok, "tp", lambda i: 16 + 4 * i)


@pytest.mark.parametrize("stepflow", [None, CFG], ids=["plain", "stepflow"])
def test_tp3_runner_writes_the_transformers_engines_traces(setup, stepflow):
    llm, model, tok, _ = setup
    assert_runner_matches(llm, model, tok, stepflow, max_new_tokens=16, max_thinking_tokens=5)


def test_tp3_stats_file_equals_collect_stats(setup):
    """The stats file a server user reads (every rank's lines, merged by the documented rule) gives the numbers
    `collect_stats` gives through the engine, for the same requests."""
    import stepscope.vllm as sv
    from stepscope.prompts import build_prompt
    from stepscope.vllm import stats_file

    llm, _, tok, stats = setup
    keys = [f"file{i}" for i in range(len(QUESTIONS))]
    ids = [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS]
    llm.generate([sv.prompt(p, CFG) for p in ids],
                 [sv.sampling_params(CFG, k, max_tokens=12 + 3 * i, temperature=0) for i, k in enumerate(keys)],
                 use_tqdm=False)
    want = sv.collect_stats(llm, keys=keys)
    got = wait_for_stats(stats, keys, ranks=TP)
    for k in keys:
        assert got[k].to_json() == want[k].to_json()
        assert want[k].total_oeb_fires > 0
    ranks = {r["stepflow_id"]: r["ranks"] for r in stats_file.requests(stats_file.read_lines(stats))}
    assert all(ranks[k] == TP for k in keys)
