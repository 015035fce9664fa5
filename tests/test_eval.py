"""Evaluation: perplexity windows, HellaSwag parsing/scoring, KL/top-1, data-source resolution, lm-eval guard."""

from __future__ import annotations

import bz2
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SHARED_DATA, shared_data_or_skip
from qat_lightning.eval import (
    EvalConfig,
    HellaSwagItem,
    TokenKL,
    Top1Agreement,
    corpus_ids,
    evaluate_model,
    kl_and_agreement,
    load_hellaswag,
    load_text,
    multiple_choice_accuracy,
    perplexity,
    resolve_path,
    text_perplexity,
)
from qat_lightning.eval.hellaswag import ending_logprobs, parse_hellaswag
from qat_lightning.eval.lm_eval_adapter import MISSING, QATLM, run_lm_eval
from qat_lightning.models import ByteTokenizer, load_model

# P[i, j] = p(next = j | current = i): a bigram "model" whose probabilities we know exactly
P = [[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]


class Bigram(nn.Module):
    """Logits depend only on the current token: logits[b, t] = table[input_ids[b, t]]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.float())  # (V, V)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def bigram_from_probs(probs) -> Bigram:
    return Bigram(torch.tensor(probs, dtype=torch.float64).log())


@pytest.fixture(scope="module")
def tiny():
    return load_model({"source": "tiny"})


# ---- perplexity ----------------------------------------------------------------------------------
def test_perplexity_matches_hand_computation_and_drops_tail():
    model = bigram_from_probs(P)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    # seq_len 3: windows [0 1 2] [0 1 2], tail [0] dropped; predicted: 0->1, 1->2 in each window
    out = perplexity(model, ids, seq_len=3)
    assert out["num_windows"] == 2 and out["num_tokens"] == 4 and out["seq_len"] == 3
    assert out["ppl"] == pytest.approx(1 / 0.6, rel=1e-6)
    # seq_len 2: windows [0 1] [2 0] [1 2], tail [0]; the transitions between windows (1->2, 0->1) are not scored
    out = perplexity(model, ids, seq_len=2, batch_size=2)
    nll = -(math.log(0.6) + math.log(0.5) + math.log(0.6)) / 3
    assert out["num_windows"] == 3 and out["num_tokens"] == 3
    assert out["nll"] == pytest.approx(nll, rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    out = perplexity(model, ids, seq_len=2, max_windows=1)
    assert out["num_windows"] == 1 and out["ppl"] == pytest.approx(1 / 0.6, rel=1e-6)


def test_perplexity_agrees_with_torchmetrics(tiny):
    from torchmetrics.text import Perplexity

    model, _ = tiny
    ids = torch.randint(0, 256, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0))
    ours = perplexity(model, ids, seq_len=16, batch_size=2)
    metric = Perplexity()
    windows = ids[: 5 * 16].view(5, 16)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    metric.update(logits[:, :-1], windows[:, 1:])
    assert ours["num_windows"] == 5
    assert ours["ppl"] == pytest.approx(metric.compute().item(), rel=1e-5)
    assert perplexity(model, ids, seq_len=16, batch_size=3)["ppl"] == pytest.approx(ours["ppl"], rel=1e-5)


def test_text_perplexity_of_uniform_model_is_vocab_size():
    model = Bigram(torch.zeros(259, 259))
    text = "héllo wörld " * 10  # non-ASCII: 2 bytes per accented letter
    out = text_perplexity(model, ByteTokenizer(), text, seq_len=8)
    assert out["num_windows"] == len(text.encode()) // 8
    assert out["ppl"] == pytest.approx(259.0, rel=1e-5)


def test_perplexity_rejects_bad_input():
    model = bigram_from_probs(P)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 4, dtype=torch.long), seq_len=2)
    with pytest.raises(ValueError, match="smaller seq_len"):
        perplexity(model, torch.zeros(3, dtype=torch.long), seq_len=4)


# ---- HellaSwag -----------------------------------------------------------------------------------
def write_bz2(path, lines):
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_hellaswag_parser_reads_a_hand_made_file(tmp_path):
    lines = ["Cooking: A man cuts", "2", "a", "b", "c", "d", "Sport: She runs", "0", "e", "f", "g", "h"]
    path = write_bz2(tmp_path / "hs.txt.bz2", lines)
    items = load_hellaswag(path)
    assert items == [
        HellaSwagItem("Cooking: A man cuts", 2, ("a", "b", "c", "d")),
        HellaSwagItem("Sport: She runs", 0, ("e", "f", "g", "h")),
    ]
    assert load_hellaswag(path, limit=1) == items[:1]
    with pytest.raises(ValueError, match="label must be 0-3"):
        parse_hellaswag(["ctx", "7", "a", "b", "c", "d"])
    with pytest.raises(ValueError, match="truncated"):
        parse_hellaswag(lines[:-1])


def test_hellaswag_parser_reads_the_shared_file():
    path = SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if not path.exists():
        pytest.skip(f"shared HellaSwag file not found at {path} (needs ../shared/data beside the repo)")
    items = load_hellaswag(path)
    assert len(items) == 10042
    assert all(0 <= it.label <= 3 and len(it.endings) == 4 for it in items)
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. he" and items[0].label == 3


def hand_ending_logprob(logp, context: str, ending: str) -> float:
    """Sum of log p(byte | previous byte) over the bytes of " " + ending, computed with plain Python."""
    seq = list(context.encode()) + list((" " + ending).encode())
    start = len(context.encode())
    return sum(logp[seq[t - 1]][seq[t]] for t in range(start, len(seq)))


def test_ending_logprobs_match_hand_computation_with_padding():
    table = torch.randn(259, 259, generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(table.double(), -1).tolist()
    items = [HellaSwagItem("ab", 1, ("x", "yyyy", "zz", "é")), HellaSwagItem("longer context", 0, ("q", "r", "s", "t"))]
    scores = ending_logprobs(Bigram(table), ByteTokenizer(), items)  # one padded batch of 8 rows
    for item, got in zip(items, scores):
        want = [hand_ending_logprob(logp, item.context, e) for e in item.endings]
        assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_acc_and_acc_norm_disagree_and_acc_norm_counts_bytes():
    # uniform model: an ending of b bytes scores -(b + 1) log V (its leading space counts), so acc picks the
    # shortest ending; per byte it is -(b + 1)/b log V, so acc_norm picks the most bytes: "éé" (4 bytes, 2 chars).
    # Per character "ccc" would win instead (-4/3 vs -5/2), so this also checks bytes, not characters.
    model = Bigram(torch.zeros(259, 259))
    endings = ("a", "bb", "ccc", "éé")
    items = [HellaSwagItem("ctx", 0, endings), HellaSwagItem("ctx", 3, endings)]
    got = multiple_choice_accuracy(model, ByteTokenizer(), items, batch_size=2)
    assert got == {"acc": 0.5, "acc_norm": 0.5}
    assert multiple_choice_accuracy(model, ByteTokenizer(), items[1:]) == {"acc": 0.0, "acc_norm": 1.0}


def test_hellaswag_scores_do_not_depend_on_batching(tiny):
    model, tok = tiny
    items = [
        HellaSwagItem("A cat", 0, ("sat.", "ran away fast.", "x", "is on the mat")),
        HellaSwagItem("Hi", 2, ("a", "bb", "c d", "ünï")),
    ]
    one = [s for it in items for s in ending_logprobs(model, tok, [it])]
    both = ending_logprobs(model, tok, items)
    for a, b in zip(one, both):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


# ---- KL / top-1 agreement ------------------------------------------------------------------------
def test_token_kl_and_top1_match_hand_computation_with_mask():
    teacher = torch.tensor([[[0.0, 0.0], [5.0, 0.0]]])  # p = [.5, .5] then mostly token 0
    student = torch.tensor([[[math.log(0.25), math.log(0.75)], [0.0, 5.0]]])  # q = [.25, .75] then token 1
    mask = torch.tensor([[1, 0]])
    kl, top1 = TokenKL(), Top1Agreement()
    kl.update(student, teacher, mask)
    top1.update(student, teacher, mask)
    assert kl.compute().item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-6)
    # position 0: teacher tie (argmax 0) vs student argmax 1 -> disagree; position 1 is masked out
    assert top1.compute().item() == 0.0
    top1.update(student[:, 1:], student[:, 1:])  # one more, agreeing, unmasked token
    assert top1.compute().item() == 0.5


def test_kl_and_agreement_identical_and_different_models(tiny):
    model, _ = tiny
    other, _ = load_model({"source": "tiny", "seed": 1})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    same = kl_and_agreement(model, model, batches)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    got = kl_and_agreement(model, other, batches)
    with torch.no_grad():  # independent implementation: torch's kl_div over the unmasked positions
        log_t = F.log_softmax(model(input_ids=ids).logits, -1)
        log_s = F.log_softmax(other(input_ids=ids).logits, -1)
    keep = mask.bool()
    want_kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)[keep].mean().item()
    want_top1 = (log_s.argmax(-1) == log_t.argmax(-1))[keep].float().mean().item()
    assert got["kl"] == pytest.approx(want_kl, rel=1e-4) and got["kl"] > 0
    assert got["top1_agreement"] == pytest.approx(want_top1)


# ---- data sources --------------------------------------------------------------------------------
def test_source_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # no HF fallback, online or not
    monkeypatch.delenv("QAT_DATA_DIR", raising=False)
    data_dir = tmp_path / "data"
    (data_dir / "wikitext2").mkdir(parents=True)
    (data_dir / "wikitext2" / "wiki.test.raw").write_bytes(b" = Title = \r\n from env\r\n")
    configured = tmp_path / "mine.txt"
    configured.write_text("configured text")

    with pytest.raises(FileNotFoundError, match="QAT_DATA_DIR") as err:
        load_text("wikitext2")
    assert "evaluate.wikitext2_path" in str(err.value) and "datasets" in str(err.value)
    monkeypatch.setenv("QAT_DATA_DIR", str(data_dir))
    assert resolve_path("wikitext2") == data_dir / "wikitext2" / "wiki.test.raw"
    assert load_text("wikitext2") == " = Title = \n from env\n"  # lines joined as Python reads them
    assert load_text("wikitext2", configured) == "configured text"  # a configured path wins over the env
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text("wikitext2", tmp_path / "typo.txt")  # a wrong configured path never falls back silently
    with pytest.raises(FileNotFoundError, match="hellaswag"):
        load_hellaswag()  # the env folder has no hellaswag file
    with pytest.raises(ValueError, match="unknown evaluation source"):
        resolve_path("mmlu")


# ---- lm-eval -------------------------------------------------------------------------------------
def test_lm_eval_missing_gives_clear_error(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # behave as if lm-eval were not installed
    model, tok = tiny
    with pytest.raises(ImportError, match="pip install 'qat-lightning\\[eval\\]'") as err:
        run_lm_eval(model, tok, ["arc_easy"])
    assert str(err.value) == MISSING
    with pytest.raises(ImportError, match="lm-eval is not installed"):
        QATLM(model, tok)
    with pytest.raises(ImportError, match="lm-eval is not installed"):
        evaluate_model(model, tok, EvalConfig(tasks=[], lm_eval_tasks=["arc_easy"]))


# ---- evaluate_model ------------------------------------------------------------------------------
def test_evaluate_model_on_tiny_model_with_shared_wikitext(tiny, monkeypatch, caplog):
    data = shared_data_or_skip()
    monkeypatch.delenv("QAT_DATA_DIR", raising=False)
    model, tok = tiny
    cfg = {
        "tasks": ["wikitext2", "kl"], "seq_len": 32, "max_windows": 2, "kl_batches": 1,
        "wikitext2_path": str(data / "wikitext2" / "wiki.test.raw"),
    }
    batches = [{"input_ids": torch.randint(0, 256, (1, 16)), "attention_mask": torch.ones(1, 16, dtype=torch.long)}]
    metrics = evaluate_model(model, tok, cfg, teacher=model, heldout_batches=batches)
    assert set(metrics) == {"wikitext2_ppl", "kl", "top1_agreement"}
    assert all(type(v) is float for v in metrics.values())
    assert math.isfinite(metrics["wikitext2_ppl"]) and metrics["wikitext2_ppl"] > 1
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["top1_agreement"] == 1.0
    # the corpus is tokenized once per tokenizer: a second method reuses the same ids
    path = cfg["wikitext2_path"]
    assert corpus_ids(tok, "wikitext2", path) is corpus_ids(tok, "wikitext2", path)
    with caplog.at_level("WARNING", logger="qat_lightning"):
        no_teacher = evaluate_model(model, tok, cfg)
    assert set(no_teacher) == {"wikitext2_ppl"} and "'kl' skipped" in caplog.text
    assert no_teacher["wikitext2_ppl"] == metrics["wikitext2_ppl"]
    with pytest.raises(ValueError, match="unknown evaluate config key"):
        evaluate_model(model, tok, {"taks": ["kl"]})


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_is_that_of_a_trained_model(monkeypatch):
    data = shared_data_or_skip()
    monkeypatch.setenv("QAT_DATA_DIR", str(data))
    model, tok = load_model({"source": "smollm2"})
    metrics = evaluate_model(model, tok, {"tasks": ["wikitext2"], "seq_len": 128, "max_windows": 2})
    assert 5 < metrics["wikitext2_ppl"] < 100  # random weights give ~vocab size (49152)


def test_evaluate_model_runs_hellaswag_from_a_configured_file(tmp_path):
    """`tasks=[hellaswag]` is lm-eval's hellaswag task over the configured file, with its limit.

    The uniform model scores an ending of b bytes -(b + 1) log V (its leading space counts): acc picks the
    shortest, "a" (index 0). The harness's acc_norm divides by the ending's characters: "ccc" (-4/3) beats
    "éé" (-5/2; per byte it would win, -5/4), so this also checks characters, not bytes.
    """
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'qat-lightning[eval]'")
    endings = ["a", "bb", "ccc", "éé"]
    lines = ["X: ctx", "0", *endings, "Y: ctx", "2", *endings, "Z: ctx", "1", *endings]
    path = write_bz2(tmp_path / "hs.txt.bz2", lines)
    cfg = EvalConfig(tasks=["hellaswag"], hellaswag_path=str(path), hellaswag_limit=2, batch_size=2)
    metrics = evaluate_model(Bigram(torch.zeros(259, 259)), ByteTokenizer(), cfg)
    # item X: acc right, acc_norm wrong; item Y: the reverse; the third item is beyond the limit
    assert metrics == pytest.approx({
        "hellaswag_acc": 0.5, "hellaswag_acc_norm": 0.5, "hellaswag_acc_stderr": 0.5,
        "hellaswag_acc_norm_stderr": 0.5, "hellaswag_n": 2.0, "hellaswag_n_total": 3.0,
    })  # stderr: the sample std of [1, 0] over sqrt(2), lm-eval's mean_stderr
    three = EvalConfig(tasks=["hellaswag"], hellaswag_path=str(path), zeroshot_limit=3)  # overrides hellaswag_limit
    assert evaluate_model(Bigram(torch.zeros(259, 259)), ByteTokenizer(), three)["hellaswag_n"] == 3
