"""The command-line options several commands share (model, decoding, StepFlow, trace format) and their reading.

Each `add_*_options(parser)` declares one group with one set of defaults; the matching reader turns the parsed
arguments into the library's objects (a loaded model, a DecodeConfig, a StepFlowConfig, a format), so every
command checks them the same way and speaks of its own option names in its errors. Nothing heavy is imported
until a reader runs, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..decoding import DecodeConfig, DecodeConfigError
from ..errors import StepscopeError
from ..formats import FORMATS, Format, get_format

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN = ("auto", "sdpa", "eager", "flash_attention_2")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


class OnOff(argparse.BooleanOptionalAction):
    """--x / --no-x that remembers which of the two were given, so that a reader refuses both at once in one
    line (argparse alone lets the last one win)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = set(getattr(namespace, "_given_" + self.dest, ()))
        setattr(namespace, "_given_" + self.dest, given | {option_string})
        super().__call__(parser, namespace, values, option_string)


def check_on_off(args: argparse.Namespace, dest: str) -> None:
    """Refuse --x given together with --no-x (an OnOff option)."""
    given = getattr(args, "_given_" + dest, ())
    if len(given) > 1:
        a, b = sorted(given, key=len)
        raise StepscopeError(f"{a} and {b} contradict each other: give one")


# -- model ------------------------------------------------------------------------------------------------------


def add_model_options(p: argparse.ArgumentParser, *, tokenizer_only: bool = False) -> None:
    """--model and --trust-remote-code; unless `tokenizer_only`, also --dtype, --device and --attn."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="hub id or local folder (default: the bundled SmolLM2-135M-Instruct)")
    if not tokenizer_only:
        g.add_argument("--dtype", default="auto",
                       help="weights dtype: auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16, float16 "
                            "(default %(default)s)")
        g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)")
        g.add_argument("--attn", default="auto", choices=ATTN,
                       help="attention implementation that Step-Saliency and StepFlow wrap (default auto: "
                            "transformers' choice, sdpa where the architecture has it, else eager)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")


def load_model(args: argparse.Namespace, **kwargs):
    """(model, tokenizer) as the model options ask; `kwargs` go to stepscope.models.load_model (device_map=...)."""
    from ..models import load_model as load

    attn = getattr(args, "attn", "auto")
    return load(args.model, device=args.device, dtype=args.dtype,
                attn_implementation=None if attn == "auto" else attn,
                trust_remote_code=args.trust_remote_code, **kwargs)


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer of --model."""
    from ..models import load_tokenizer as load

    return load(args.model, trust_remote_code=args.trust_remote_code)


def model_layers(args: argparse.Namespace) -> int:
    """The number of layers of --model, from its config alone (checks options before the weights load)."""
    from ..models import load_config, num_layers

    return num_layers(load_config(args.model, trust_remote_code=args.trust_remote_code))


# -- engine -----------------------------------------------------------------------------------------------------

ENGINES = ("transformers", "vllm")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--engine and vLLM's --tensor-parallel-size, --data-parallel-size, --max-model-len."""
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="transformers", choices=ENGINES,
                   help="transformers: stepscope's own decode loop (default); vllm: a vLLM engine with the "
                        "stepscope plugin (pip install 'stepscope[vllm]'; docs/vllm.md)")
    g.add_argument("--tensor-parallel-size", type=positive_int, default=None, metavar="N",
                   help="vLLM: split the model over N devices (default 1)")
    g.add_argument("--data-parallel-size", type=positive_int, default=None, metavar="N",
                   help="vLLM: N engines (each of --tensor-parallel-size GPUs) share the questions (default 1)")
    g.add_argument("--max-model-len", type=positive_int, default=None, metavar="TOKENS",
                   help="vLLM: the longest sequence (prompt and answer) its KV cache is sized for (default: the "
                        "model's)")


@dataclass
class Engine:
    """What a command generates with: `generate_fn(model, tokenizer, questions, ...)` has the signature of
    `stepscope.flow.generate_traces`; `run_config(**settings)` is the config its traces record."""

    name: str
    model: object  # a transformers model, a vLLM LLM, or a vLLM data-parallel pool
    tokenizer: object
    generate_fn: Callable
    run_config: Callable[..., dict]
    where: str  # for the start line: "cpu", "cuda:0", "vLLM 0.32.0, tensor parallel 1"
    version: str | None = None  # vLLM's version (the transformers engine records none)


def load_engine(args: argparse.Namespace, stepflow: bool = False, **kwargs) -> Engine:
    """The engine the engine and model options ask for; `stepflow`: the run has StepFlow requests (a vLLM that
    cannot serve them is refused before it starts); `kwargs` go to the transformers engine's load_model."""
    vllm_only = {"--tensor-parallel-size": args.tensor_parallel_size, "--data-parallel-size": args.data_parallel_size,
                 "--max-model-len": args.max_model_len}
    if args.engine == "transformers":
        given = [k for k, v in vllm_only.items() if v is not None]
        if given:
            raise StepscopeError(f"--engine vllm is needed for {', '.join(given)}")
        from ..flow.generate import generate_traces, run_config

        model, tokenizer = load_model(args, **kwargs)
        return Engine("transformers", model, tokenizer, generate_traces,
                      lambda **s: run_config(model, tokenizer, **s), str(getattr(model, "device", "")))
    for flag, value in (("--device", getattr(args, "device", None)), ("--device-map", kwargs.get("device_map"))):
        if value is not None:
            raise StepscopeError(f"{flag} applies to --engine transformers (vLLM places the model itself; "
                                 "CUDA_VISIBLE_DEVICES chooses its GPUs)")
    if getattr(args, "attn", "auto") != "auto":
        raise StepscopeError("--attn applies to --engine transformers (vLLM uses its own attention backend)")
    if getattr(args, "flow_kernel", None) is not None:
        raise StepscopeError("--flow-kernel applies to --engine transformers")
    if args.trust_remote_code:
        raise StepscopeError("--trust-remote-code is not passed to vLLM: stepscope runs no model code with it")
    from ..models import resolve_model_path
    from ..vllm.driver import engine as ve

    version = ve.require_vllm()
    from ..vllm.driver.runner import generate_traces, run_config
    from ..vllm.plugin.register import support_problem

    problem = support_problem() if stepflow else None
    if problem:  # e.g. a vLLM outside the tested range, or a platform without a StepFlow backend
        raise StepscopeError(f"--engine vllm cannot run StepFlow here ({problem}); use --no-stepflow or "
                             "--arms baseline with vLLM, or the transformers engine for StepFlow")

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(args)
    tp, dp = args.tensor_parallel_size or 1, args.data_parallel_size or 1
    llm_kw = ve.engine_kwargs(path, dtype=args.dtype, tensor_parallel_size=tp, max_model_len=args.max_model_len)
    where = f"vLLM {version}, " + (f"{dp} engines x " if dp > 1 else "") + f"tensor parallel {tp}"
    if dp > 1:
        pool = ve.DataParallel(dp, llm_kw, path)
        return Engine("vllm", pool, tokenizer, ve.pool_generate_traces, pool.run_config, where, version)
    llm = ve.load_llm(**llm_kw)
    return Engine("vllm", llm, tokenizer, generate_traces, lambda **s: run_config(llm, tokenizer, **s), where,
                  version)


# -- decoding ---------------------------------------------------------------------------------------------------


def add_decoding_options(p: argparse.ArgumentParser, *, max_new_tokens: int = DecodeConfig.max_new_tokens,
                         seed_help: str = "base seed; row i samples with seed + i") -> argparse._ArgumentGroup:
    """The DecodeConfig fields as options (--max-new-tokens ... --seed) and --batch-size; returns the group."""
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="tokens to generate at most (default %(default)s)")
    d.add_argument("--max-thinking-tokens", type=int, default=DecodeConfig.max_thinking_tokens,
                   help="budget forcing: close the thinking with its end marker after this many thinking tokens "
                        "(default: no limit)")
    d.add_argument("--temperature", type=float, default=DecodeConfig.temperature,
                   help="0 means greedy (default %(default)s)")
    d.add_argument("--top-p", type=float, default=DecodeConfig.top_p,
                   help="nucleus sampling mass (default %(default)s)")
    d.add_argument("--top-k", type=int, default=DecodeConfig.top_k,
                   help="keep the k most likely tokens (default 0: all)")
    d.add_argument("--seed", type=int, default=DecodeConfig.seed, help=seed_help + " (default %(default)s)")
    d.add_argument("--batch-size", type=positive_int, default=8, help="rows decoded together (default %(default)s)")
    return d


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    """The DecodeConfig of the decoding options; a bad value is an error naming its option."""
    try:
        return DecodeConfig(max_new_tokens=args.max_new_tokens, max_thinking_tokens=args.max_thinking_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except DecodeConfigError as e:
        raise StepscopeError(f"{_flag(e.field)} {e.problem}") from None


# -- StepFlow ---------------------------------------------------------------------------------------------------


def add_stepflow_options(p: argparse.ArgumentParser, *, switches: bool = True) -> None:
    """StepFlow's knobs (--tau-max, --alpha, --oeb-layers, --smi-layers, --smi-window). With `switches`, also
    --stepflow/--no-stepflow, --no-oeb, --no-smi and --flow-kernel (a command whose arms choose what is on,
    like eval, leaves them out)."""
    f = p.add_argument_group("StepFlow (paper defaults: OEB on the bottom quarter of layers, SMI on the top quarter)")
    if switches:
        f.add_argument("--stepflow", action=OnOff, default=True,
                       help="apply StepFlow while generating (default: on)")
    f.add_argument("--stepflow-config", default=None, metavar="FILE.json",
                   help="start from this StepFlow config (as `stepscope calibrate` writes it); the options below "
                        "override its fields")
    f.add_argument("--tau-max", type=float, default=None, help="OEB bridge target cap (default 0.15)")
    f.add_argument("--alpha", type=float, default=None, help="SMI strength (default 0.06)")
    f.add_argument("--oeb-layers", default=None, metavar="LAYERS",
                   help="OEB layers: 0-6, 0,1,2, -4--1 (ranges inclusive; negative counts from the end; default: "
                        "the bottom quarter)")
    f.add_argument("--smi-layers", default=None, metavar="LAYERS",
                   help="SMI layers, e.g. 21-27, or --smi-layers=-7--1 for the last seven (default: the top quarter)")
    f.add_argument("--smi-window", default=None, metavar="W",
                   help="SMI averages the last W tokens of the finished step (default 4), or 'step' for all")
    if switches:
        f.add_argument("--no-oeb", action="store_true", help="turn the Odds-Equal Bridge off")
        f.add_argument("--no-smi", action="store_true", help="turn Step Momentum Injection off")
        f.add_argument("--flow-kernel", choices=["auto", "triton", "torch"], default=None,
                       help="how OEB layers decode: auto (default, or $STEPSCOPE_FLOW_KERNEL) times the fused "
                            "Triton kernel against the PyTorch path on CUDA and uses the faster; triton or torch "
                            "pin one (bit-for-bit repeatable runs)")


def stepflow_knobs(args: argparse.Namespace) -> dict:
    """The StepFlowConfig fields the knob options set (only those given); layer lists read by
    stepscope.layers.parse_layers, as written (negative indices are resolved against the model later)."""
    from ..layers import parse_layers

    kw: dict = {}
    for name in ("tau_max", "alpha", "smi_window"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    for name in ("oeb_layers", "smi_layers"):
        spec = getattr(args, name)
        if spec is not None:
            layers = parse_layers(spec, what=_flag(name))
            if layers is None:  # "all"
                raise StepscopeError(f"{_flag(name)}: name the layers (all is not a StepFlow band)")
            kw[name] = layers
    return kw


def check_stepflow_layers(args: argparse.Namespace, num_layers: int) -> None:
    """--oeb-layers and --smi-layers against a model of `num_layers` layers; an index outside it is an error
    naming the option (before anything is loaded or written)."""
    from ..layers import parse_layers

    for name in ("oeb_layers", "smi_layers"):
        if getattr(args, name, None) is not None:
            parse_layers(getattr(args, name), num_layers, what=_flag(name))


def stepflow_base(args: argparse.Namespace):
    """The StepFlowConfig of --stepflow-config, or None when it is not given."""
    if getattr(args, "stepflow_config", None) is None:
        return None
    from ..flow.config import StepFlowConfig

    return StepFlowConfig.load(args.stepflow_config)


def stepflow_config(args: argparse.Namespace):
    """The StepFlowConfig the StepFlow options ask for (--stepflow-config, then the knobs over it), or None with
    --no-stepflow."""
    knobs = {"--stepflow-config": args.stepflow_config, "--tau-max": args.tau_max, "--alpha": args.alpha, "--oeb-layers": args.oeb_layers,
             "--smi-layers": args.smi_layers, "--smi-window": args.smi_window,
             "--no-oeb": args.no_oeb or None, "--no-smi": args.no_smi or None, "--flow-kernel": args.flow_kernel}
    check_on_off(args, "stepflow")
    if not args.stepflow:
        given = [k for k, v in knobs.items() if v is not None]
        if given:
            raise StepscopeError(f"{', '.join(given)} given with --no-stepflow")
        return None
    if args.no_oeb and args.no_smi:
        raise StepscopeError("--no-oeb and --no-smi turn everything off: use --no-stepflow")
    from dataclasses import replace

    from ..flow.config import StepFlowConfig

    base = stepflow_base(args) or StepFlowConfig()
    config = replace(base, oeb=base.oeb and not args.no_oeb, smi=base.smi and not args.no_smi, **stepflow_knobs(args))
    if not config.oeb and not config.smi:
        raise StepscopeError(f"{args.stepflow_config} with --no-oeb/--no-smi turns everything off: use --no-stepflow")
    return config


# -- the trace format -------------------------------------------------------------------------------------------


def add_format_options(p: argparse.ArgumentParser) -> None:
    """--fmt and --markers: how the traces mark their thinking."""
    p.add_argument("--fmt", default=None, choices=["auto", *FORMATS, "markers"],
                   help="thinking format (default auto: from the chat template, then the text)")
    p.add_argument("--markers", nargs=2, metavar=("START", "END"), default=None,
                   help="custom thinking start and end strings (implies --fmt markers)")


def format_arg(args: argparse.Namespace) -> str | Format:
    """The format the options name: "auto", "think", "harmony", or the Format of --markers."""
    if args.markers:  # --markers implies --fmt markers
        if args.fmt not in (None, "markers"):
            raise StepscopeError(f"--fmt {args.fmt} contradicts --markers (which means --fmt markers): give one")
        return get_format("markers", markers=tuple(args.markers))
    if args.fmt == "markers":
        raise StepscopeError("--fmt markers needs --markers START END")
    return args.fmt or "auto"


# -- trace files ------------------------------------------------------------------------------------------------


def is_trace_json(path: str) -> bool:
    """Whether a file is a stepscope trace JSON (then no tokenizer is needed to read it)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return head.lstrip().startswith("{") and '"stepscope_trace"' in head


def safe_name(s: str) -> str:
    """A trace id as a file or folder name: letters, digits, `.`, `_` and `-`, at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._")[:100] or "trace"


def warn_other_model(args: argparse.Namespace, rebuilt: list, tokenizer) -> None:
    """Warn once (on stderr) when records rebuilt with --model's tokenizer name another model (their meta
    "model"): their tokens then come from --model's chat template and system prompt, not the ones the named
    model saw. A model counts as the same when its last path part matches --model's or the tokenizer's."""
    import sys
    from pathlib import PurePosixPath

    def key(name: str) -> str:
        return PurePosixPath(str(name).strip().rstrip("/")).name.lower()

    mine = {key(args.model), key(getattr(tokenizer, "name_or_path", "") or "")}
    named = sorted({t.meta["model"] for t in rebuilt if isinstance(t.meta.get("model"), str) and t.meta["model"].strip()})
    others = [m for m in named if key(m) not in mine]
    if not others:
        return
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    used = "the bundled default model" if args.model == "default" else args.model
    print(f"stepscope {args.command}: warning: the records name the model {shown}, but their tokens are rebuilt "
          f"with the tokenizer and chat template of {used}; pass --model {others[0]} (its hub id or local folder) "
          "to rebuild them as that model saw them", file=sys.stderr, flush=True)
