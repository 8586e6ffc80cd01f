"""What a sentence-transformers model directory declares, read from its own files, without
torch, transformers or sentence-transformers (the ONNX backend runs without them):

    modules.json                 the pipeline: Transformer, Pooling, Normalize
    1_Pooling/config.json        the pooling modes
    sentence_bert_config.json    the window (max_seq_length) and do_lower_case
    tokenizer.json               the Rust tokenizer; tokenizer_config.json its pad token

Also the weights' identity (their sha256, checked at load) for every local backend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpipe.errors import ModelLoadError

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
# sentence-transformers' Pooling concatenates the modes it is given, in this order.
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
# Modes this reader does not reproduce: a model that asks for one is refused, not approximated.
_UNSUPPORTED_POOLING = ("weightedmean_tokens", "lasttoken")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(model_dir: Path) -> Path:
    for name in _WEIGHT_FILES:
        candidate = model_dir / name
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"no weights ({' or '.join(_WEIGHT_FILES)}) under {model_dir}")


def checked_weights(name: str, model_dir: Path, expected_sha256: str | None) -> str:
    """The sha256 of the model's weights; ModelLoadError when they are not the expected ones."""
    weights = weights_file(model_dir)
    weights_sha256 = file_sha256(weights)
    if expected_sha256 and weights_sha256 != expected_sha256:
        raise ModelLoadError(
            f"weights of {name} at {weights} have sha256 {weights_sha256}, "
            f"expected {expected_sha256}"
        )
    return weights_sha256


def weights_identity(name: str, model_dir: Path, expected_sha256: str | None) -> str:
    """``checked_weights``, or, where the weights were left out, the sha256 they are known to
    have: the slim image ships the bundled model's ONNX exports, which hold its weights, and
    not the torch weights file they were made from (91 MB)."""
    if expected_sha256 and not any((model_dir / file).is_file() for file in _WEIGHT_FILES):
        return expected_sha256
    return checked_weights(name, model_dir, expected_sha256)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def plain_copy(tokenizer: Any) -> Any:
    """A private copy of a Rust ``tokenizers.Tokenizer`` with no padding and no truncation.

    Its settings are fixed here and never changed, so it may be shared: encoding only reads
    it (a ``&self`` call that several threads may make at once). Each copy of a BERT
    vocabulary costs ~8 MiB resident, so a model's text side keeps one, not one per use."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def token_counter(tokenizer: Any, max_tokens: int) -> Any:
    """A private copy of a Rust ``tokenizers.Tokenizer``, truncating at the window, never padding.

    Counting must not use the tokenizer that embeds: a transformers tokenizer call sets
    padding and truncation on the shared Rust object, so a count on the event loop racing an
    ``encode`` on the model thread can leave that batch unpadded ("Unable to create tensor").
    The copy's settings are fixed here once; encoding with it only reads it."""
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(tokenizer.to_str())
    counter.no_padding()
    counter.enable_truncation(max_length=max_tokens)
    return counter


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """The parts of a model directory that decide its vectors, besides the weights."""

    directory: Path
    max_tokens: int
    do_lower_case: bool
    pooling: tuple[str, ...]  # a subset of POOLING_MODES, in their order
    normalize: bool
    pad_token: str

    @property
    def tokenizer_file(self) -> Path:
        return self.directory / "tokenizer.json"

    def tokenizer(self) -> Any:
        """The model's Rust tokenizer, cut at the window and padded to a batch's longest text
        (tokenizer.json often carries other settings: 128 tokens, fixed padding)."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        pad_id = tokenizer.token_to_id(self.pad_token)
        if pad_id is None:
            raise ModelLoadError(f"pad token {self.pad_token!r} missing in {self.tokenizer_file}")
        tokenizer.enable_truncation(max_length=self.max_tokens)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=self.pad_token)
        return tokenizer

    def identity(self) -> dict[str, Any]:
        """What of these files changes a vector, for the cache fingerprint."""
        return {
            "pooling": list(self.pooling),
            "normalize": self.normalize,
            "max_tokens": self.max_tokens,
            "do_lower_case": self.do_lower_case,
        }


def read_model_files(model_dir: Path) -> ModelFiles:
    """The pipeline a sentence-transformers directory declares; ModelLoadError for a module
    or pooling mode that only sentence-transformers' own code would run."""
    modules = read_json(model_dir / "modules.json") or [{"type": _TRANSFORMER, "path": ""}]
    kinds = [module.get("type") for module in modules]
    if not kinds or kinds[0] != _TRANSFORMER or modules[0].get("path", "") != "":
        raise ModelLoadError(f"{model_dir}: the first module must be a Transformer at its root")
    unknown = [kind for kind in kinds[1:] if kind not in (_POOLING, _NORMALIZE)]
    if unknown:
        raise ModelLoadError(f"{model_dir}: modules {unknown} are not supported without torch")
    pooling_dirs = [m.get("path", "") for m in modules if m.get("type") == _POOLING]
    pooling = _pooling_modes(model_dir / pooling_dirs[0] if pooling_dirs else None)
    config = read_json(model_dir / "sentence_bert_config.json") or {}
    return ModelFiles(
        directory=model_dir,
        max_tokens=int(config.get("max_seq_length") or _default_window(model_dir)),
        do_lower_case=bool(config.get("do_lower_case", False)),
        pooling=pooling,
        normalize=_NORMALIZE in kinds,
        pad_token=_pad_token(model_dir),
    )


def _pooling_modes(pooling_dir: Path | None) -> tuple[str, ...]:
    """The pooling modes switched on in 1_Pooling/config.json; mean without one (as
    sentence-transformers does for a plain transformers model)."""
    config = read_json(pooling_dir / "config.json") if pooling_dir else None
    if not config:
        return ("mean_tokens",)
    asked = [mode for mode in _UNSUPPORTED_POOLING if config.get(f"pooling_mode_{mode}")]
    if asked:
        raise ModelLoadError(f"pooling {asked} of {pooling_dir} is not supported without torch")
    modes = tuple(mode for mode in POOLING_MODES if config.get(f"pooling_mode_{mode}"))
    if not modes:
        raise ModelLoadError(f"{pooling_dir} switches on no pooling mode")
    return modes


def _default_window(model_dir: Path) -> int:
    """No max_seq_length: the smaller of the tokenizer's and the position embeddings' limits."""
    limits = [
        (read_json(model_dir / "tokenizer_config.json") or {}).get("model_max_length"),
        (read_json(model_dir / "config.json") or {}).get("max_position_embeddings"),
    ]
    known = [int(limit) for limit in limits if isinstance(limit, int | float) and limit < 1e6]
    if not known:
        raise ModelLoadError(f"{model_dir} declares no window (max_seq_length)")
    return min(known)


def _pad_token(model_dir: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = (read_json(model_dir / name) or {}).get("pad_token")
        if isinstance(token, dict):  # an AddedToken written out
            token = token.get("content")
        if isinstance(token, str):
            return token
    return "[PAD]"
