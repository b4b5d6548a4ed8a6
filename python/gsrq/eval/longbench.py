"""LongBench (v1) the way its authors run it, with any gsrq cache method.

Following THUDM/LongBench ``pred.py`` / ``eval.py`` / ``metrics.py``:

- per-task prompt templates (``config/dataset2prompt.json``) filled with the
  sample's ``context`` and ``input``, and per-task generation lengths
  (``config/dataset2maxlen.json``);
- a prompt longer than ``max_length`` tokens is truncated in the middle: the
  first ``max_length // 2`` and the last ``max_length // 2`` tokens are
  decoded (special tokens skipped) and joined;
- chat models get their chat template, except on trec, triviaqa, samsum,
  lsht, lcc and repobench-p (few-shot / completion tasks);
- greedy decoding; samsum also stops at a newline and generates at least one
  token;
- metrics: qa F1 (SQuAD normalisation), ROUGE-L (the ``rouge`` package's
  summary-level ROUGE-L over "."-separated sentences, re-implemented here),
  classification, retrieval, count and code similarity (``fuzzywuzzy``'s
  ratio, i.e. difflib), the prediction cut to its first line for trec,
  triviaqa, samsum and lsht; per sample the max over the reference answers;
  per task ``100 x mean``, rounded to 2 decimals.

Chinese tasks need ``jieba`` for qa_f1_zh / rouge_zh (as LongBench's own
metrics do); without it those tasks are reported as unavailable.

Data: a directory with ``{task}.jsonl`` files in LongBench's format (fields
``input``, ``context``, ``answers``, ``all_classes``, ``length``, ...). The
Hugging Face dataset cannot be downloaded by gsrq (it runs offline);
download it elsewhere (``THUDM/LongBench``, ``data.zip``) and point ``--data``
at the unpacked directory.
"""

from __future__ import annotations

import difflib
import json
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gsrq.errors import GsrqError, InvalidValueError

# --------------------------------------------------------------- task tables
PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}

TASKS = tuple(PROMPTS)
ENGLISH_TASKS = tuple(t for t in TASKS if t not in (
    "multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"))
# tasks where chat models do better without their chat template (LongBench pred.py)
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# predictions cut to their first line before scoring (LongBench eval.py)
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})


class MetricUnavailableError(GsrqError):
    """A metric needs a package that is not installed (jieba for Chinese tasks)."""


# ------------------------------------------------------------------ metrics
def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, articles and extra spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_zh_answer(s: str) -> str:
    """Lower case, drop ASCII and Chinese punctuation and all whitespace."""
    drop = set(string.punctuation + _ZH_PUNCT)
    return "".join("".join(ch for ch in s.lower() if ch not in drop).split())


def _token_f1(pred: Sequence[str], truth: Sequence[str]) -> float:
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    p = same / len(pred)
    r = same / len(truth)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 of the SQuAD-normalised strings."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise MetricUnavailableError("Chinese LongBench metrics need the 'jieba' package (pip install jieba)") from None
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 over jieba words, each normalised (Chinese punctuation removed)."""
    p = [t for t in (normalize_zh_answer(x) for x in _jieba_cut(prediction)) if t]
    g = [t for t in (normalize_zh_answer(x) for x in _jieba_cut(ground_truth)) if t]
    return _token_f1(p, g)


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The words of one longest common subsequence of ``x`` and ``y``
    (backtracking prefers dropping from ``y`` on ties, as the ``rouge`` package)."""
    n, m = len(x), len(y)
    t = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], t[i], t[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, ground_truth: str) -> float:
    """Summary-level ROUGE-L F of the ``rouge`` package (``Rouge().get_scores``).

    Texts are split into sentences at ".", each whitespace-normalised; words
    are counted as sets; the union LCS of each reference sentence with the
    candidate sentences is accumulated. ``F = 2PR / (P + R + 1e-8)``.
    Raises ValueError on an empty text (LongBench then scores 0).
    """
    hyp = [" ".join(p.split()) for p in prediction.split(".") if len(p) > 0]
    ref = [" ".join(p.split()) for p in ground_truth.split(".") if len(p) > 0]
    if not hyp or not ref:
        raise ValueError("empty hypothesis or reference")
    ref_words = {w for s in ref for w in s.split(" ")}
    hyp_words = {w for s in hyp for w in s.split(" ")}
    union: set[str] = set()
    for r in ref:
        rw = r.split(" ")
        for h in hyp:
            union |= set(_lcs_words(rw, h.split(" ")))
    r_lcs = len(union) / len(ref_words)
    p_lcs = len(union) / len(hyp_words)
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    try:
        return rouge_l(prediction, ground_truth)
    except (ValueError, ZeroDivisionError):
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """1 / (number of class names found in the prediction) if the true class is
    among them, else 0. Class names contained in the true class (but not equal to
    it) are discarded first, with LongBench's removal-while-iterating behaviour."""
    matched = [c for c in kwargs["all_classes"] if c in prediction]
    for term in matched:  # noqa: B909 - mirrors the reference, which skips the element after a removal
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _id_score(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise InvalidValueError(f"reference {ground_truth!r} does not match {pattern!r}")
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == found[0] for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to the paragraph id of ``Paragraph N``."""
    return _id_score(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _id_score(prediction, ground_truth, r"段落(\d+)")


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to the reference count."""
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(ground_truth) for n in numbers) / len(numbers)


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` (pure-Python path): rounded 100 x difflib ratio; 0 if either is empty."""
    if not a or not b:
        return 0
    if a == b:
        return 100
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Similarity of the first prediction line that is not a comment or code fence."""
    line = ""
    for cand in prediction.lstrip("\n").split("\n"):
        if "`" not in cand and "#" not in cand and "//" not in cand:
            line = cand
            break
    return fuzz_ratio(line, ground_truth) / 100


METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score,
    "musique": qa_f1_score, "dureader": rouge_zh_score, "gov_report": rouge_score,
    "qmsum": rouge_score, "multi_news": rouge_score, "vcsum": rouge_zh_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score,
    "passage_count": count_score, "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}


def sample_score(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None) -> float:
    """Max over the reference answers of the task's metric (in [0, 1])."""
    if task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for truth in answers:
        score = max(score, METRIC[task](prediction, truth, all_classes=all_classes))
    return score


def task_score(task: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
               all_classes: Sequence[str] | None) -> float:
    """LongBench's per-task score: ``round(100 * mean(sample scores), 2)``."""
    if not predictions:
        raise InvalidValueError(f"no predictions for task {task!r}")
    total = sum(sample_score(task, p, a, all_classes) for p, a in zip(predictions, answers, strict=True))
    return round(100 * total / len(predictions), 2)


# --------------------------------------------------------------------- data
def load_task(data: str | Path, task: str, limit: int | None = None) -> list[dict]:
    """Samples of ``task`` from ``{data}/{task}.jsonl``."""
    if task not in PROMPTS:
        raise InvalidValueError(f"unknown LongBench task {task!r}; tasks: {', '.join(TASKS)}")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise InvalidValueError(
            f"LongBench data {str(data)!r} is not a directory. gsrq runs offline and cannot download "
            "Hugging Face datasets: download THUDM/LongBench (data.zip) elsewhere and pass the directory "
            "holding {task}.jsonl files"
        )
    path = root / f"{task}.jsonl"
    if not path.is_file():
        raise InvalidValueError(f"{str(path)!r} not found (LongBench data directory must hold {task}.jsonl)")
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            missing = [k for k in ("input", "context", "answers") if k not in obj]
            if missing:
                raise InvalidValueError(f"{path}:{lineno}: missing field(s) {missing}")
            if not isinstance(obj["answers"], list) or not obj["answers"]:
                raise InvalidValueError(f"{path}:{lineno}: 'answers' must be a non-empty list")
            samples.append(obj)
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise InvalidValueError(f"{str(path)!r} holds no samples")
    return samples


# ------------------------------------------------------------------ prompts
def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> str:
    """LongBench's truncation: if ``prompt`` tokenizes (with special tokens) to more
    than ``max_length`` tokens, keep the decoded first and last ``max_length // 2``."""
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = int(max_length / 2)
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:], skip_special_tokens=True)


def uses_chat_template(tokenizer: Any, task: str, chat: str = "auto") -> bool:
    """Whether the prompt of ``task`` is wrapped in the chat template.

    chat: ``"auto"`` (when the tokenizer has one), ``"on"`` or ``"off"``. Tasks in
    :data:`NO_CHAT_TEMPLATE` never are.
    """
    if chat not in ("auto", "on", "off"):
        raise InvalidValueError(f"chat must be auto, on or off, got {chat!r}")
    if task in NO_CHAT_TEMPLATE or chat == "off":
        return False
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat == "on" and not has:
        raise InvalidValueError("chat=on but the tokenizer has no chat template")
    return has


def build_input_ids(tokenizer: Any, task: str, sample: dict, max_length: int, chat: str = "auto") -> torch.Tensor:
    """Token ids ``[1, L]`` of one sample: template, middle truncation, chat template."""
    prompt = truncate_middle(tokenizer, PROMPTS[task].format(**sample), max_length)
    if uses_chat_template(tokenizer, task, chat):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        special = not (bos and text.startswith(bos))
        ids = tokenizer(text, truncation=False, add_special_tokens=special)["input_ids"]
    else:
        ids = tokenizer(prompt, truncation=False)["input_ids"]
    if not ids:
        raise InvalidValueError(f"a {task} prompt tokenizes to no tokens (after truncation to {max_length})")
    return torch.tensor([ids], dtype=torch.long)


def generate_answer(model: Any, tokenizer: Any, task: str, input_ids: torch.Tensor,
                    cache_factory: Callable[[], Any] | None = None) -> str:
    """Greedy answer of ``model`` (``MAX_NEW_TOKENS[task]`` new tokens at most)."""
    from gsrq.eval.ppl import generate_cache_kwarg

    kwargs: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS[task], "do_sample": False, "num_beams": 1}
    gc = model.generation_config
    for k in ("temperature", "top_p", "top_k"):
        if getattr(gc, k, None) is not None:
            kwargs[k] = None  # greedy: silence sampling defaults of the checkpoint
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    if task == "samsum":
        newline = tokenizer.encode("\n", add_special_tokens=False)
        stops = [t for t in (tokenizer.eos_token_id, newline[-1] if newline else None) if t is not None]
        kwargs["eos_token_id"] = stops
        kwargs["min_new_tokens"] = 1
    if cache_factory is not None:
        cache = cache_factory()
        if cache is not None:
            kwargs[generate_cache_kwarg()] = cache
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------- run
@dataclass
class TaskResult:
    task: str
    score: float | None
    samples: int
    seconds: float
    note: str = ""
    predictions: list[dict] = field(default_factory=list)


def run_longbench(model: Any, tokenizer: Any, data: str | Path, tasks: Sequence[str], *, max_length: int,
                  cache_factory: Callable[[], Any] | None = None, chat: str = "auto", limit: int | None = None,
                  progress: bool = True) -> list[TaskResult]:
    """Predict and score every task; Chinese tasks without jieba get ``score=None`` and a note."""
    from tqdm.auto import tqdm

    if max_length < 2:
        raise InvalidValueError(f"max_length must be >= 2, got {max_length}")
    results = []
    for task in tasks:
        samples = load_task(data, task, limit)
        t0 = time.perf_counter()
        preds = []
        for s in tqdm(samples, desc=task, disable=not progress, leave=False):
            ids = build_input_ids(tokenizer, task, s, max_length, chat)
            pred = generate_answer(model, tokenizer, task, ids, cache_factory)
            preds.append({"pred": pred, "answers": s["answers"], "all_classes": s.get("all_classes"),
                          "length": s.get("length"), "prompt_tokens": int(ids.shape[1])})
        try:
            score = task_score(task, [p["pred"] for p in preds], [p["answers"] for p in preds],
                               samples[0].get("all_classes"))
            note = ""
        except MetricUnavailableError as e:
            score, note = None, f"unavailable: {e}"
        results.append(TaskResult(task, score, len(samples), time.perf_counter() - t0, note, preds))
    return results


def average(results: Sequence[TaskResult]) -> float | None:
    """Mean of the available task scores (LongBench's unweighted average)."""
    vals = [r.score for r in results if r.score is not None]
    return round(sum(vals) / len(vals), 2) if vals else None


__all__ = [
    "ENGLISH_TASKS", "MAX_NEW_TOKENS", "METRIC", "MetricUnavailableError", "NO_CHAT_TEMPLATE", "PROMPTS",
    "TASKS", "TaskResult", "average", "build_input_ids", "classification_score", "code_sim_score",
    "count_score", "generate_answer", "load_task", "qa_f1_score", "qa_f1_zh_score", "retrieval_score",
    "retrieval_zh_score", "rouge_l", "rouge_score", "rouge_zh_score", "run_longbench", "sample_score",
    "task_score", "truncate_middle",
]
