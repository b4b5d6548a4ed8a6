"""LongBench: metrics against hand-computed values, prompt building and
truncation, data errors, and an end-to-end run on fixture files with a tiny
random LLaMA and a word-level tokenizer built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gsrq.errors import InvalidValueError
from gsrq.eval import longbench as lb
from gsrq.eval.ppl import FakeQuantCache, identity_quantizer

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
FIXTURE_TASKS = ["hotpotqa", "trec", "passage_count", "lcc", "samsum"]


# ------------------------------------------------------------------ metrics
def test_qa_f1_known_values():
    # "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1
    assert math.isclose(lb.qa_f1_score("The cat sat on the mat.", "a cat on a mat"), 2 * 0.75 / 1.75)
    assert lb.qa_f1_score("Paris!", "paris") == 1.0
    assert lb.qa_f1_score("London", "Paris") == 0.0
    assert lb.qa_f1_score("", "Paris") == 0.0
    # repeated tokens count with multiplicity: 2 common of 3 each
    assert math.isclose(lb.qa_f1_score("x x y", "x y y"), 2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_rouge_l_single_sentence_matches_rouge_score_package():
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("the cat sat on mat", "the cat ran to mat"), ("one two three four", "four three two one"),
             ("alpha beta gamma", "alpha beta gamma delta epsilon")]
    for pred, ref in pairs:
        want = sc.score(ref, pred)["rougeL"].fmeasure
        assert math.isclose(lb.rouge_score(pred, ref), want, abs_tol=1e-6), (pred, ref)


def test_rouge_l_is_summary_level_union_lcs():
    # per reference sentence, the union of its LCS with each candidate sentence:
    # "a c" -> {a} + {c}; "b d" -> {b} + {d}: union 4 of 4 words, F = 1
    assert math.isclose(lb.rouge_score("a b. c d", "a c. b d"), 1.0, abs_tol=1e-6)
    # a plain (sentence-free) LCS would give 3/4
    assert math.isclose(lb.rouge_score("a b c d", "a c b d"), 0.75, abs_tol=1e-6)
    # words are counted as sets: "x x y" has 2 distinct words; LCS words {x, y}
    assert math.isclose(lb.rouge_score("x x y", "x y"), 1.0, abs_tol=1e-6)
    assert lb.rouge_score("", "a b") == 0.0 and lb.rouge_score("...", "a b") == 0.0


def test_classification_score():
    classes = ["City", "Number of something", "Individual", "Date"]
    assert lb.classification_score("Number of something or City", "Number of something", all_classes=classes) == 0.5
    assert lb.classification_score("Individual", "Individual", all_classes=classes) == 1.0
    assert lb.classification_score("nothing here", "City", all_classes=classes) == 0.0
    # a class contained in the true class is discarded
    assert lb.classification_score("Date of birth", "Date of birth", all_classes=["Date", "Date of birth"]) == 1.0


def test_retrieval_count_and_code_scores():
    assert lb.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert lb.retrieval_score("Paragraph 3 or 12", "Paragraph 3") == 0.5
    assert lb.retrieval_score("none", "Paragraph 3") == 0.0
    assert lb.retrieval_zh_score("段落7", "段落7") == 1.0
    assert lb.count_score("There are 5 unique, not 6", "5") == 0.5
    assert lb.count_score("15", "5") == 0.0
    # first line that is not a fence or comment; difflib ratio 2*4/10 -> 80
    assert lb.code_sim_score("```\n# add\nx = 1\n", "x = 2") == 0.8
    assert lb.code_sim_score("\n\nreturn a - b", "return a - b") == 1.0
    assert lb.code_sim_score("# only comments", "x") == 0.0


def test_task_score_max_over_answers_first_line_and_rounding():
    classes = ["City", "Individual"]
    # trec keeps only the first line: "Individual" alone scores 1
    assert lb.sample_score("trec", "\nIndividual\nCity", ["Individual"], classes) == 1.0
    assert lb.sample_score("hotpotqa", "Snowy Mountains", ["the Snowy Mountains", "Alps"], None) == 1.0
    preds = ["1857", "in 1857 or 1858", "no"]
    answers = [["1857"], ["1857"], ["1857"]]
    # 1, F1(3 tokens vs 1: P=1/4? "in 1857 or 1858" -> 4 tokens, 1 common: P=1/4 R=1 -> 0.4), 0
    assert lb.task_score("hotpotqa", preds, answers, None) == round(100 * (1 + 0.4 + 0) / 3, 2)


def test_chinese_metrics_report_missing_jieba_clearly():
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(lb.MetricUnavailableError, match="jieba"):
            lb.qa_f1_zh_score("北京", "北京")
    else:
        assert lb.qa_f1_zh_score("北京", "北京") == 1.0


def test_task_tables_cover_every_task():
    assert set(lb.PROMPTS) == set(lb.MAX_NEW_TOKENS) == set(lb.METRIC)
    assert len(lb.TASKS) == 21
    assert lb.MAX_NEW_TOKENS["gov_report"] == 512 and lb.MAX_NEW_TOKENS["hotpotqa"] == 32
    assert lb.NO_CHAT_TEMPLATE == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


# -------------------------------------------------------- tokenizer, model
def _words():
    words = set()
    for task in FIXTURE_TASKS:
        for line in (FIXTURES / f"{task}.jsonl").read_text().splitlines():
            obj = json.loads(line)
            text = lb.PROMPTS[task].format(**obj) + " " + " ".join(obj["answers"])
            words.update(pre_tokenizers.Whitespace().pre_tokenize_str(text) and
                         [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)])
    return sorted(words)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<|user|>": 3, "<|assistant|>": 4}
    for w in _words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    t.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    t.chat_template = "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}<|assistant|>"
    return t


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_truncate_middle_keeps_both_ends(tokenizer):
    words = _words()[:30]
    prompt = " ".join(words)
    assert lb.truncate_middle(tokenizer, prompt, 64) == prompt  # 31 tokens with BOS
    out = lb.truncate_middle(tokenizer, prompt, 10)
    # tokens: <s> w0..w29; first 5 = <s> w0..w3 (BOS skipped when decoding), last 5 = w25..w29
    assert out == " ".join(words[:4]) + " ".join(words[25:])


def test_chat_template_only_where_longbench_uses_it(tokenizer):
    sample = json.loads((FIXTURES / "hotpotqa.jsonl").read_text().splitlines()[0])
    ids = lb.build_input_ids(tokenizer, "hotpotqa", sample, 4096)
    # the template has no BOS, so the tokenizer adds its own before the chat markers
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert ids[0, 1].item() == tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[0, -1].item() == tokenizer.convert_tokens_to_ids("<|assistant|>")
    plain = lb.build_input_ids(tokenizer, "hotpotqa", sample, 4096, chat="off")
    assert plain[0, 0].item() == tokenizer.bos_token_id
    assert ids.shape[1] == plain.shape[1] + 2
    assert ids[0, 2:-1].tolist() == plain[0, 1:].tolist()
    trec = json.loads((FIXTURES / "trec.jsonl").read_text().splitlines()[0])
    assert lb.build_input_ids(tokenizer, "trec", trec, 4096)[0, 0].item() == tokenizer.bos_token_id
    # truncation happens before the template: at most max_length prompt tokens + 2 markers
    short = lb.build_input_ids(tokenizer, "hotpotqa", sample, 24)
    assert short.shape[1] <= 24 + 2


def test_data_errors(tmp_path):
    with pytest.raises(InvalidValueError, match="offline"):
        lb.load_task("THUDM/LongBench", "hotpotqa")
    with pytest.raises(InvalidValueError, match="hotpotqa.jsonl"):
        lb.load_task(tmp_path, "hotpotqa")
    (tmp_path / "trec.jsonl").write_text('{"input": "x"}\n')
    with pytest.raises(InvalidValueError, match="missing field"):
        lb.load_task(tmp_path, "trec")
    (tmp_path / "lcc.jsonl").write_text("not json\n")
    with pytest.raises(InvalidValueError, match="not JSON"):
        lb.load_task(tmp_path, "lcc")
    with pytest.raises(InvalidValueError, match="unknown LongBench task"):
        lb.load_task(FIXTURES, "nope")
    assert len(lb.load_task(FIXTURES, "hotpotqa", limit=1)) == 1


def test_end_to_end_on_fixtures(model, tokenizer):
    results = lb.run_longbench(model, tokenizer, FIXTURES, FIXTURE_TASKS, max_length=40, progress=False)
    assert [r.task for r in results] == FIXTURE_TASKS
    for r in results:
        assert r.samples == len(r.predictions) >= 1
        preds = [p["pred"] for p in r.predictions]
        assert r.score == lb.task_score(r.task, preds, [p["answers"] for p in r.predictions],
                                        r.predictions[0]["all_classes"])
        assert 0.0 <= r.score <= 100.0
        for p in r.predictions:
            assert p["prompt_tokens"] <= 40 + 2
            assert len(tokenizer(p["pred"], add_special_tokens=False)["input_ids"]) <= lb.MAX_NEW_TOKENS[r.task]
    assert lb.average(results) == round(sum(r.score for r in results) / len(results), 2)
    # a fake-quantized cache with the identity quantizer predicts the same text
    same = lb.run_longbench(
        model, tokenizer, FIXTURES, ["hotpotqa", "lcc"], max_length=40, progress=False,
        cache_factory=lambda: FakeQuantCache(lambda l, k: identity_quantizer, sinks=4, exact_prefill=True))
    by_task = {r.task: r for r in results}
    for r in same:
        assert [p["pred"] for p in r.predictions] == [p["pred"] for p in by_task[r.task].predictions]


def test_cli_refuses_hub_dataset_names():
    import argparse

    from gsrq.eval import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["longbench", "--data", "THUDM/LongBench", "--tasks", "hotpotqa", "--max-length", "100"])
    with pytest.raises(InvalidValueError, match="cannot download"):
        cli.run(args)
    args = parser.parse_args(["longbench", "--data", str(FIXTURES), "--tasks", "hotpotqa,nope", "--max-length", "100"])
    with pytest.raises(InvalidValueError, match="unknown LongBench task 'nope'"):
        cli.run(args)
