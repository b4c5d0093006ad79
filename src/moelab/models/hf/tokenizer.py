"""A Hugging Face model's own tokenizer behind moelab's ``Tokenizer`` interface.

``PretrainedTokenizer`` wraps the fast tokenizer (``tokenizers.Tokenizer``, the folder's
``tokenizer.json``) with the model's ``eos_id``/``bos_id``/``pad_id`` (pad falls back to eos, bos to
eos when the model has none). ``encode`` adds no special tokens (moelab's corpus pipeline adds EOS
between documents itself); ``decode`` keeps special tokens. ``kind`` is ``"pretrained"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moelab.data.tokenizer import Tokenizer
from moelab.errors import MoelabError


class PretrainedTokenizer(Tokenizer):
    """See the module docstring."""

    def __init__(self, hf_tokenizer: Any, *, eos_id: int, bos_id: int | None = None, pad_id: int | None = None):
        self.kind = "pretrained"
        self._hf = hf_tokenizer
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = int(eos_id)
        self.bos_id = int(bos_id) if bos_id is not None else self.eos_id
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id

    def specials(self) -> dict[str, int]:
        return {"eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id}

    @classmethod
    def load(cls, path: str | os.PathLike, **specials: int) -> "PretrainedTokenizer":  # type: ignore[override]
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if not p.is_file():
            raise MoelabError(f"tokenizer file {str(p)!r} is missing")
        return cls(HFTokenizer.from_file(str(p)), **specials)

    def __repr__(self) -> str:
        return f"PretrainedTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _first(x: Any) -> int | None:
    if isinstance(x, (list, tuple)):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def from_transformers(tok: Any, hf_config: Any = None) -> PretrainedTokenizer:
    """From a ``transformers`` fast tokenizer (``AutoTokenizer``), ids from it or the model config."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise MoelabError(f"tokenizer {type(tok).__name__} has no fast (tokenizers) backend; "
                          "save the model with a tokenizer.json")
    cfg = lambda n: _first(getattr(hf_config, n, None)) if hf_config is not None else None  # noqa: E731
    eos = _first(tok.eos_token_id) if tok.eos_token_id is not None else cfg("eos_token_id")
    if eos is None:
        raise MoelabError("the tokenizer and the model config define no eos_token_id; set one in tokenizer_config.json")
    bos = _first(tok.bos_token_id) if tok.bos_token_id is not None else cfg("bos_token_id")
    pad = _first(tok.pad_token_id) if tok.pad_token_id is not None else cfg("pad_token_id")
    return PretrainedTokenizer(backend, eos_id=eos, bos_id=bos, pad_id=pad)
