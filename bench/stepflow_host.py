"""StepFlow's host (Python) work per decoding step, our code and a baseline checkout side by side.

Why: on the GPU a 7B decoding step at batch 1 is host-bound (bench/results/stepflow_cuda_r1-distill-qwen-7b_h100.*:
about 22 ms of host time per step against ~10 ms of GPU work), so StepFlow's overhead there is its per-step
Python bookkeeping, not its kernels. Where a step is device-bound instead, only the host work before the step's
first kernel (the pre-hook) leaves the device idle. Both can be measured on any CPU: this script runs a random model of
R1-Distill-Qwen-7B's layer and head counts with tiny widths (`proxy-7b`: 28 layers, OEB on 0-6, SMI on 21-27)
under StepFlow(kernel="triton") with the Triton launches stubbed out (the split kernel's launcher only zeroes
the output, so the text and the segmentation are the same in every run), and times, per decoding step:
- pre: StepFlow's forward pre-hook (the row state, the one upload; the segmenters too in trees that feed them
  there): host time at the start of a step, before the step's first kernel, while the device waits;
- oeb: the OEB layers' attention wrapper (bookkeeping and launch preparation; no kernel runs);
- other: the other layers' wrapper minus the sdpa call it wraps;
- feed: the segmenters taking the step's token (trees that defer it to the first SMI layer);
- post: StepFlow's forward hook after the layers (trees that prepare the next step's state there).
Greedy, left-padded prompts (256 tokens), 128 new tokens, one CPU thread. Each part is the median over the
decoding steps of a run (total: the median step's sum), then the median over interleaved rounds.

  python bench/stepflow_host.py                           # this checkout
  python bench/stepflow_host.py --baseline-src OLD/src    # and another checkout's src (e.g. a git worktree)

The baseline runs in its own process with OLD/src first on sys.path; the two alternate round by round.
Results: bench/results/stepflow_host_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pre", "oeb", "other", "feed", "post", "total")


def measure(batch: int, prompt_tokens: int, new_tokens: int, tokenizer: str | None) -> dict:
    """One process: per-step host milliseconds of each part, for one batch size (imports stepscope from
    whatever src is first on sys.path)."""
    import torch

    torch.set_num_threads(1)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from stepscope.core import kernels  # from the tree first on sys.path
    from stepscope.flow import StepFlow, StepFlowConfig
    from stepscope.flow import attention as att
    from stepscope.flow import stepflow as sfm

    sys.path.insert(1, str(ROOT / "bench"))
    import stepflow_overhead as so  # (puts our src on sys.path, but stepscope is already imported)

    def split_stub(*a, **k):  # the real launch's arguments, no kernel: zero the output (args[19])
        a[19].zero_()

    class Launcher:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return self.fn

    launchers = (Launcher(split_stub), Launcher(lambda *a, **k: None))
    kernels._kernels = lambda: launchers
    kernels.available = lambda device: True

    steps: list[dict] = []  # per decoding step: seconds of each part
    acc = {}
    on = [False]
    pre_orig = sfm.StepFlow._pre_forward

    def pre(self, module, args, kwargs):
        nonlocal acc
        t = time.perf_counter()
        r = pre_orig(self, module, args, kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if on[0] and ids.shape[1] == 1:
            acc = dict.fromkeys(("oeb", "other", "sdpa_in_other", "feed", "feed_in_post", "post"), 0.0)
            acc["pre"] = time.perf_counter() - t
            steps.append(acc)
        else:
            acc = dict.fromkeys(("pre", "oeb", "other", "sdpa_in_other", "feed", "feed_in_post", "post"), 0.0)
            # (the prefill: not recorded)
        return r

    sfm.StepFlow._pre_forward = pre
    fa_orig = att.flow_attention
    bound_last = hasattr(att, "FlowBinding")  # flow_attention(fn, module, query, ..., fs, bound); older trees:
    # flow_attention(flow, fn, module, query, ...)

    def fa(*a, **k):
        t = time.perf_counter()
        r = fa_orig(*a, **k)
        module, query = (a[1], a[2]) if bound_last else (a[2], a[3])
        oeb = a[-1].oeb if bound_last else a[0]._oeb_set
        if on[0] and query.shape[2] == 1:
            acc["oeb" if module.layer_idx in oeb else "other"] += time.perf_counter() - t
        return r

    att.flow_attention = fa
    in_post = [False]
    post_orig = getattr(sfm.StepFlow, "_post_forward", None)
    if post_orig is not None:  # trees that prepare the next step's state after each forward

        def post(self, *a, **k):
            t = time.perf_counter()
            in_post[0] = True
            try:
                return post_orig(self, *a, **k)
            finally:
                in_post[0] = False
                acc["post"] += time.perf_counter() - t

        sfm.StepFlow._post_forward = post
    try:  # trees that feed a decoding step's token at the first SMI layer: Rows.feed_pending, or older
        from stepscope.flow.rows import Rows as feeder
        feed_name = "feed_pending"
    except ImportError:
        feeder, feed_name = sfm.StepFlow, "_feed_deferred"
    feed_orig = getattr(feeder, feed_name, None)
    if feed_orig is not None:

        def feed(self):
            if feed_name == "feed_pending" and not self.has_pending:
                return feed_orig(self)  # nothing held back: not a feeding
            t = time.perf_counter()
            feed_orig(self)
            acc["feed_in_post" if in_post[0] else "feed"] += time.perf_counter() - t

        setattr(feeder, feed_name, feed)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def timed_sdpa(module, query, *a, **k):
        t = time.perf_counter()
        r = sdpa(module, query, *a, **k)
        if on[0] and query.shape[2] == 1:
            acc["sdpa_in_other"] += time.perf_counter() - t
        return r

    ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = timed_sdpa

    class Args:
        shape = "proxy-7b"
        device = "cpu"
        dtype = None

    Args.tokenizer = tokenizer
    model, tok = so.load(Args)
    ids, mask = so.prompts(tok, batch, prompt_tokens)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=0)

    def run():
        with torch.inference_mode(), StepFlow(model, tok, StepFlowConfig(fmt="think"), kernel="triton") as f:
            out = model.generate(**kw)
        assert f.decode_path.uses_kernel if hasattr(f, "decode_path") else f._fused
        return out

    first = run()  # warm-up
    on[0] = True
    out = run()
    assert torch.equal(first, out)
    assert len(steps) == new_tokens - 1  # decoding forwards (the first new token comes from the prefill)
    for a in steps:
        # the feed runs inside the first SMI layer's wrapper, or inside the post-hook when no SMI layer runs
        a["other"] -= a.pop("sdpa_in_other") + a["feed"]
        a["post"] -= a["feed_in_post"]
        a["feed"] += a.pop("feed_in_post")
        a["total"] = a["pre"] + a["oeb"] + a["other"] + a["feed"] + a["post"]
    # the median step of each part (robust to the odd slow step of a shared machine: a GC pause, a preemption)
    res = {k: statistics.median(a[k] for a in steps) * 1e3 for k in PARTS}
    res["text_hash"] = hash(tuple(out[0].tolist())) & 0xFFFFFFFF
    res["src"] = str(Path(att.__file__).parents[2])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--baseline-src", default=None, help="another checkout's src folder to compare with")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--_child", nargs=2, metavar=("SRC", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        sys.path.insert(0, args._child[0])
        print(json.dumps(measure(int(args._child[1]), args.prompt_tokens, args.new_tokens, args.tokenizer)))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    from stepscope.io import atomic_write_json, atomic_write_text

    trees = {"ours": str(ROOT / "src")}
    if args.baseline_src:
        trees["baseline"] = str(Path(args.baseline_src).resolve())
        if not (Path(trees["baseline"]) / "stepscope" / "flow" / "stepflow.py").is_file():
            sys.exit(f"--baseline-src {args.baseline_src}: no stepscope/flow/stepflow.py there (give a checkout's "
                     "src folder)")
    commits = {}
    for name, src in trees.items():
        g = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True).stdout.strip()
        commits[name] = (g.stdout.strip() or "?") + (" + uncommitted changes" if dirty else "")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = {"what": "StepFlow host ms per decoding step (proxy-7b, kernel launches stubbed)", "trees": trees, "commits": commits,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "batches": {}}
    for B in [int(x) for x in args.batch_sizes.split(",")]:
        runs = {name: [] for name in trees}
        for r in range(args.rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                cmd = [sys.executable, __file__, "--_child", trees[name], str(B), "--prompt-tokens",
                       str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
                if args.tokenizer:
                    cmd += ["--tokenizer", args.tokenizer]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if p.returncode:
                    sys.exit(f"{name} (batch {B}) failed:\n{p.stderr[-3000:]}")
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
                if Path(runs[name][-1]["src"]) != Path(trees[name]):
                    sys.exit(f"{name} imported stepscope from {runs[name][-1]['src']}, not {trees[name]}")
                print(f"batch {B:>3} round {r + 1} {name:>8}: " +
                      ", ".join(f"{k} {v:.3f} ms" for k, v in runs[name][-1].items() if k in PARTS),
                      flush=True)
        row = {}
        for name, rs in runs.items():
            row[name] = {k: statistics.median(x[k] for x in rs) for k in PARTS}
            row[name]["text_hash"] = rs[0]["text_hash"]
        if "baseline" in row:
            row["same_text"] = row["ours"]["text_hash"] == row["baseline"]["text_hash"]
            row["ratio_total"] = row["ours"]["total"] / row["baseline"]["total"]
        res["batches"][str(B)] = row
    lines = ["# StepFlow host work per decoding step (ms, CPU, kernel launches stubbed)", "",
             f"proxy-7b (28 layers, OEB 0-6, SMI 21-27), {args.prompt_tokens}-token prompts, {args.new_tokens} "
             f"new tokens, greedy, 1 thread, median step, median of {args.rounds} interleaved rounds. Trees: "
             + ", ".join(f"{k} = `{v}` (commit {commits[k]})" for k, v in trees.items())
             + ". Same generated text in both trees: " + ", ".join(
                 f"batch {b}: {'yes' if r.get('same_text') else 'no'}" for b, r in res["batches"].items()
                 if "same_text" in r), "",
             "| batch | tree | pre-hook | OEB layers | other layers (wrapper only) | deferred feeding | "
             "post-hook (next step's state) | total | total / baseline | pre-hook / baseline |",
             "|---:|:--|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for B, row in res["batches"].items():
        for name in trees:
            m = row[name]
            ratio = pre_ratio = "-"
            if name == "ours" and "ratio_total" in row:
                ratio = f"{row['ratio_total']:.2f}"
                pre_ratio = f"{m['pre'] / row['baseline']['pre']:.2f}"
            lines.append(f"| {B} | {name} | {m['pre']:.3f} | {m['oeb']:.3f} | {m['other']:.3f} | {m['feed']:.3f} "
                         f"| {m['post']:.3f} | {m['total']:.3f} | {ratio} | {pre_ratio} |")
    lines += ["", "Where a decoding step is host-bound every part adds to its time. Where it is device-bound the "
              "device waits for the pre-hook alone: the layers' work, the deferred feeding included, runs while "
              "the device computes the layers launched before, and the post-hook while it finishes the step."]
    out = Path(args.out)
    atomic_write_json(out / "stepflow_host_cpu.json", res)
    atomic_write_text(out / "stepflow_host_cpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
