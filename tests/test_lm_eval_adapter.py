"""`QATLM` against the real lm-eval API (0.4.x) on a tiny random Llama with the byte tokenizer, offline.

Scores are checked against an independent computation (one unpadded forward, plain torch log_softmax),
against lm-eval's own `hf` model (HFLM) wrapped around the same model, and end to end inside
`lm_eval.simple_evaluate` on tasks defined over a local JSON-lines file (nothing is downloaded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'qat-lightning[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from qat_lightning.eval import EvalConfig, evaluate_model  # noqa: E402
from qat_lightning.eval.lm_eval_adapter import QATLM, flatten_results  # noqa: E402
from qat_lightning.models import ByteTokenizer, load_model  # noqa: E402

BOS, EOS = ByteTokenizer.bos_token_id, ByteTokenizer.eos_token_id


@pytest.fixture(scope="module")
def tiny():
    return load_model({"source": "tiny"})


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# summed float32 log-probs: batched vs unbatched matmuls round differently (1.5e-5 seen at -227)
LL_TOL = {"rel": 1e-6, "abs": 1e-5}


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ---- the independent reference: one unpadded forward per sequence -----------------------------------
@torch.no_grad()
def token_logprobs(model: nn.Module, seq: list[int]) -> torch.Tensor:
    """log p(seq[i] | seq[:i]) for i = 1..len-1: (len(seq) - 1,)."""
    logits = model(input_ids=torch.tensor([seq])).logits[0].float()  # (T, V)
    return F.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)


def ref_loglikelihood(model: nn.Module, ctx: list[int], cont: list[int], max_length: int = 10**9) -> float:
    window = (ctx + cont)[-(max_length + 1) :]  # the model sees at most max_length inputs
    return token_logprobs(model, window)[-len(cont) :].sum().item()


def ref_rolling(model: nn.Module, tokens: list[int], max_length: int) -> float:
    """lm-eval's documented windows, written out: every token scored once; a window predicts up to
    `max_length` tokens from the `max_length` tokens before its end (BOS before the first token)."""
    seq, total, done = [BOS, *tokens], 0.0, 0  # seq[j + 1] is tokens[j]
    while done < len(tokens):
        n = min(max_length, len(tokens) - done)
        end = done + n  # this window predicts seq[done + 1 : end + 1]
        total += token_logprobs(model, seq[max(0, end - max_length) : end + 1])[-n:].sum().item()
        done = end
    return total


@torch.no_grad()
def ref_greedy(model: nn.Module, seq: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(model(input_ids=torch.tensor([seq + out])).logits[0, -1].argmax()))
    return out


# ---- loglikelihood -----------------------------------------------------------------------------------
def test_loglikelihood_matches_torch_log_softmax(tiny):
    model, tok = tiny
    lm = QATLM(model, tok, batch_size=2, max_length=32)
    cases = [  # (context, continuation) -> the ids lm-eval's convention scores
        (("The sky is", " blue"), (ids("The sky is"), ids(" blue"))),
        (("Hello ", "world"), (ids("Hello"), ids(" world"))),  # a trailing space belongs to the continuation
        (("", "abc"), ([BOS], ids("abc"))),  # an empty context is the BOS token (as lm-eval's HFLM)
        (("   ", "abc"), ([BOS], ids("   abc"))),  # only spaces: the same, with the spaces scored
        (("Grüße aus", " Köln"), (ids("Grüße aus"), ids(" Köln"))),  # multi-byte characters
        (("x" * 40 + " end", " yz"), (ids("x" * 40 + " end"), ids(" yz"))),  # longer than max_length=32
    ]
    got = lm.loglikelihood(requests("loglikelihood", [args for args, _ in cases]))
    assert len(got) == len(cases)
    for (ll, greedy), (args, (ctx, cont)) in zip(got, cases):
        assert type(ll) is float and type(greedy) is bool
        assert ll == pytest.approx(ref_loglikelihood(model, ctx, cont, max_length=32), **LL_TOL), args
        assert ll < 0
    # an empty continuation has probability 1 and never reaches the model
    assert lm.loglikelihood(requests("loglikelihood", [("abc", "")])) == [(0.0, True)]


def test_is_greedy_is_true_exactly_for_the_argmax_continuation(tiny):
    model, tok = tiny
    lm = QATLM(model, tok)
    for i in range(64):  # a context whose 3 greedy bytes are printable ASCII, so they round-trip as text
        context = f"item {i}:"
        greedy = ref_greedy(model, ids(context), 3)
        if all(32 <= t < 127 for t in greedy):
            break
    else:
        pytest.fail("no context with a printable greedy continuation")
    text = bytes(greedy).decode()
    other = text[:-1] + ("a" if text[-1] != "a" else "b")
    (ll, is_greedy), (ll_other, other_greedy) = lm.loglikelihood(
        requests("loglikelihood", [(context, text), (context, other)])
    )
    assert is_greedy and not other_greedy
    assert ll == pytest.approx(ref_loglikelihood(model, ids(context), greedy), **LL_TOL)
    assert ll > ll_other  # the last byte differs, and the greedy one is the most likely
    assert lm.generate_until(requests("generate_until", [(context, {"until": [], "max_gen_toks": 3})])) == [text]


# ---- loglikelihood_rolling ---------------------------------------------------------------------------
def test_rolling_is_the_sum_of_token_logprobs(tiny):
    model, tok = tiny
    text = "A short document, scored token by token."
    (got,) = QATLM(model, tok).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(token_logprobs(model, [BOS, *ids(text)]).sum().item(), **LL_TOL)


def test_rolling_windows_longer_than_max_length(tiny):
    model, tok = tiny
    texts = ["x", "exactly sixteen!", "a text of 50 bytes that needs four windows of 16..", "é" * 20]
    got = QATLM(model, tok, batch_size=2, max_length=16).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(t,) for t in texts])
    )
    for value, text in zip(got, texts):
        assert value == pytest.approx(ref_rolling(model, ids(text), 16), **LL_TOL), text
    # with a window as long as the text it is the plain sum; the windows above did change the number
    plain = token_logprobs(model, [BOS, *ids(texts[2])]).sum().item()
    assert got[2] != pytest.approx(plain, abs=1e-3)


# ---- batching ----------------------------------------------------------------------------------------
def test_batch_size_does_not_change_any_number(tiny):
    model, tok = tiny
    pairs = [("The sky is", " blue"), ("", "abc"), ("A much longer context than the others", " x"), ("Hi ", "there")]
    texts = ["short", "a longer text that spans several windows of sixteen tokens each", "mid-sized text"]
    one, three = QATLM(model, tok, batch_size=1, max_length=16), QATLM(model, tok, batch_size=3, max_length=16)
    ll1 = one.loglikelihood(requests("loglikelihood", pairs))
    ll3 = three.loglikelihood(requests("loglikelihood", pairs))
    assert [g for _, g in ll1] == [g for _, g in ll3]
    assert [v for v, _ in ll1] == pytest.approx([v for v, _ in ll3], **LL_TOL)
    roll = [(t,) for t in texts]
    rolled1 = one.loglikelihood_rolling(requests("loglikelihood_rolling", roll))
    rolled3 = three.loglikelihood_rolling(requests("loglikelihood_rolling", roll))
    assert rolled1 == pytest.approx(rolled3, **LL_TOL)


# ---- generate_until ----------------------------------------------------------------------------------
class Scripted(nn.Module):
    """Greedy output fixed by position: after T input tokens the argmax is `script[T - 1]`."""

    def __init__(self, script: list[int], vocab: int = 259) -> None:
        super().__init__()
        self.script, self.vocab = script, vocab

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        b, t = input_ids.shape
        nxt = torch.tensor([self.script[min(i, len(self.script) - 1)] for i in range(t)])
        return SimpleNamespace(logits=F.one_hot(nxt, self.vocab).float().expand(b, t, self.vocab))


def test_generate_until_stops_at_stop_strings_eos_and_max_gen_toks():
    script = [ord("?"), *ids("hello\nworld"), EOS, *ids("never")]  # after "ab": "hello\nworld", then EOS
    lm = QATLM(Scripted(script), ByteTokenizer())
    args = [
        ("ab", {"until": ["\n"]}),
        ("ab", {"until": "\n"}),  # one stop string given as a str
        ("ab", {"until": ["wor", "xyz"]}),  # the stop string itself is cut
        ("ab", {"until": []}),  # only EOS stops it
        ("ab", {"until": ["\n"], "max_gen_toks": 3}),
        ("", {"until": ["l"]}),  # an empty context starts from BOS, one token: script[0] comes first
    ]
    want = ["hello", "hello", "hello\n", "hello\nworld", "hel", "?he"]
    assert lm.generate_until(requests("generate_until", args)) == want


def test_generate_until_matches_hf_greedy_generate(tiny):
    model, tok = tiny
    context = "Once upon a time"
    (got,) = QATLM(model, tok).generate_until(requests("generate_until", [(context, {"until": [], "max_gen_toks": 8})]))
    new = model.generate(
        torch.tensor([ids(context)]), max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=EOS
    )[0, len(context) :].tolist()
    new = new[: new.index(EOS)] if EOS in new else new
    assert got == tok.decode(new)


# ---- lm-eval's own hf model as a second reference ----------------------------------------------------
def byte_level_hf_tokenizer():
    """A `PreTrainedTokenizerFast` with exactly the byte tokenizer's ids (bytes 0-255, BOS, EOS, PAD)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))  # GPT-2's byte -> unicode map, which ByteLevel pre-tokenization uses
    char = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    vocab = {char[b]: b for b in range(256)} | {"<s>": BOS, "</s>": EOS, "<pad>": BOS + 2}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_scores_equal_lm_evals_own_hf_model():
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model({"source": "tiny"})  # HFLM may touch the model: not the shared fixture
    hf_tok = byte_level_hf_tokenizer()
    assert hf_tok("Grüße ", add_special_tokens=False)["input_ids"] == ids("Grüße ")
    hflm = HFLM(pretrained=model, tokenizer=hf_tok, batch_size=2, max_length=16, device="cpu")
    ours = QATLM(model, tok, batch_size=3, max_length=16)
    pairs = requests("loglikelihood", [("The sky is", " blue"), ("Hello ", "world"), ("", "abc"), ("x" * 30, "yz")])
    for (a, ga), (b, gb) in zip(ours.loglikelihood(pairs), hflm.loglikelihood(pairs)):
        assert a == pytest.approx(b, **LL_TOL) and ga == gb
    texts = requests("loglikelihood_rolling", [("short",), ("a longer text that needs several windows of 16",)])
    assert ours.loglikelihood_rolling(texts) == pytest.approx(hflm.loglikelihood_rolling(texts), **LL_TOL)


# ---- inside the harness, on tasks over a local file ----------------------------------------------------
ITEMS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud", "salty"], "answer": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "five", "six"], "answer": 1},
    {"question": "Fire is", "choices": ["cold", "wet", "hot", "round"], "answer": 2},
    {"question": "Ice is", "choices": ["hot", "cold", "red", "soft"], "answer": 1},
    {"question": "Cats say", "choices": ["woof", "moo", "meow", "quack"], "answer": 2},
]
GEN_KWARGS = {"until": ["\n"], "max_gen_toks": 4}


def write_tasks(folder: Path, items: list[dict]) -> Path:
    """Three lm-eval tasks (multiple choice, rolling, generation) over one local JSON-lines file.

    `dataset_path: json` is a builder packaged with `datasets`, so loading it needs no network.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    source = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf_cache")},
        "test_split": "test",
    }
    tasks = {
        "qat_tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                        "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "qat_tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                             "doc_to_target": "{{text}}", "metric_list": [{"metric": "bits_per_byte"}]},
        "qat_tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                         "doc_to_target": "{{target}}", "generation_kwargs": GEN_KWARGS,
                         "metric_list": [{"metric": "exact_match"}]},
    }
    for name, spec in tasks.items():  # JSON is valid YAML
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **source, **spec}, indent=1))
    return folder


def ref_choice_accuracy(model: nn.Module, items: list[dict]) -> tuple[float, float]:
    """(acc, acc_norm) as lm-eval defines them: continuation " " + choice; acc_norm divides by len(choice)."""
    acc = acc_norm = 0
    for item in items:
        lls = [ref_loglikelihood(model, ids(item["question"]), ids(" " + c)) for c in item["choices"]]
        acc += max(range(len(lls)), key=lambda j: lls[j]) == item["answer"]
        acc_norm += max(range(len(lls)), key=lambda j: lls[j] / len(item["choices"][j])) == item["answer"]
    return acc / len(items), acc_norm / len(items)


def test_simple_evaluate_runs_offline_tasks_end_to_end(tiny, tmp_path):
    model, tok = tiny
    items = [dict(item, text=f"{item['question']} {item['choices'][item['answer']]}.") for item in ITEMS]
    greedy = [tok.decode(ref_greedy(model, ids(item["question"]), 4)).split("\n")[0] for item in items]
    for i, item in enumerate(items):  # the first two targets are the greedy outputs: exact_match 2/5
        item["target"] = greedy[i] if i < 2 else "no such output"
    want_em = sum(g == item["target"] for g, item in zip(greedy, items)) / len(items)
    folder = write_tasks(tmp_path / "tasks", items)

    out = lm_eval.simple_evaluate(
        model=QATLM(model, tok, batch_size=3),
        tasks=["qat_tiny_mc", "qat_tiny_rolling", "qat_tiny_gen"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        bootstrap_iters=0,
    )
    metrics = flatten_results(out["results"])
    assert set(metrics) == {"qat_tiny_mc_acc", "qat_tiny_mc_acc_norm", "qat_tiny_rolling_bits_per_byte",
                            "qat_tiny_gen_exact_match"}
    acc, acc_norm = ref_choice_accuracy(model, items)
    assert metrics["qat_tiny_mc_acc"] == pytest.approx(acc)
    assert metrics["qat_tiny_mc_acc_norm"] == pytest.approx(acc_norm)
    total_ll = sum(token_logprobs(model, [BOS, *ids(item["text"])]).sum().item() for item in items)
    total_bytes = sum(len(item["text"].encode("utf-8")) for item in items)
    assert metrics["qat_tiny_rolling_bits_per_byte"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-5)
    assert metrics["qat_tiny_gen_exact_match"] == pytest.approx(want_em) and want_em >= 0.4


def test_evaluate_model_runs_lm_eval_tasks_from_an_include_path(tiny, tmp_path):
    model, tok = tiny
    folder = write_tasks(tmp_path / "tasks", [dict(item, text="t", target="t") for item in ITEMS])
    cfg = EvalConfig(tasks=[], lm_eval_tasks=["qat_tiny_mc"], lm_eval_limit=3, lm_eval_include_path=str(folder),
                     batch_size=2)
    metrics = evaluate_model(model, tok, cfg)
    assert set(metrics) == {"qat_tiny_mc_acc", "qat_tiny_mc_acc_norm"}  # no sample_len, alias or stderr
    acc, acc_norm = ref_choice_accuracy(model, ITEMS[:3])
    assert metrics == pytest.approx({"qat_tiny_mc_acc": acc, "qat_tiny_mc_acc_norm": acc_norm})


# ---- small pieces ------------------------------------------------------------------------------------
def test_flatten_results_keeps_filters_apart_and_drops_non_metrics():
    results = {
        "gsm8k": {"alias": "gsm8k", "sample_len": 5, "exact_match,strict-match": 0.25,
                  "exact_match_stderr,strict-match": 0.1, "exact_match,flexible-extract": 0.5},
        "arc_easy": {"acc,none": 0.75, "acc_stderr,none": "N/A", "acc_norm,none": 0.5},
    }
    assert flatten_results(results) == {
        "gsm8k_exact_match_strict-match": 0.25, "gsm8k_exact_match_flexible-extract": 0.5,
        "arc_easy_acc": 0.75, "arc_easy_acc_norm": 0.5,
    }


def test_max_length_defaults_to_the_models_context(tiny):
    model, tok = tiny
    assert QATLM(model, tok).max_length == model.config.max_position_embeddings
    assert QATLM(Scripted([0]), ByteTokenizer()).max_length == 2048
    assert QATLM(model, tok, max_length=64).max_length == 64
    lm = QATLM(model, tok)
    assert (lm.prefix_token_id, lm.eot_token_id, lm.rank, lm.world_size) == (BOS, EOS, 0, 1)
