"""llama.cpp itself runs our GGUFs and agrees with the fake-quant student (skipped without llama-cpp-python).

Tolerances reached on a tiny random Llama (head_dim 64, 128 tokens), quant=q4_0, per token:
KL(student‖llama.cpp) < 2e-5 nats (measured 2e-6 .. 4e-6), max |Δlogit| < 2 % of max |logit| (measured
0.6 % .. 0.9 %), top-1 agreement >= 0.98 (measured 0.99 .. 1.0), with KV f16, q8_0 and q4_0. What is left
is llama.cpp's own float arithmetic (f16 attention inputs, SIMD exp/silu, Q8_0 of the rotated queries).

On SmolLM2 (WikiText-2, 4 windows x 512, benchmarks/bench_llamacpp.py --quality --harness) the q4_0 RTN
student and llama.cpp agree to KL 4.5e-3 / 5.2e-3 / 6.1e-2 and top-1 0.957 / 0.950 / 0.846 (KV f16 / q8_0 /
q4_0): the float-noise floor of the student itself (1e-7 relative noise on its norm weights moves it by KL
4.3e-3 / top-1 0.963 with KV f16 and 5.4e-2 / 0.855 with KV q4_0: Q8_0/Q4_0 rounding flips amplify any float
difference). The slow test checks perplexity there (0.3 % apart).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[engine]'")

from gguf import GGUFReader  # noqa: E402

from conftest import CONF_DIR, shared_data_or_skip  # noqa: E402
from qat_lightning.eval.config import EvalConfig  # noqa: E402
from qat_lightning.export.gguf import GGUFError, export_gguf  # noqa: E402
from qat_lightning.export.llamacpp import (  # noqa: E402
    EngineUnavailable,
    engine_has_amx,
    kv_cache_bytes,
    kv_type_of,
    llamacpp_logits,
    llamacpp_quantize,
    llamacpp_scores,
    llamacpp_speed,
    load_gguf,
    score_windows,
)
from qat_lightning.models import build_tiny_config, build_tiny_model  # noqa: E402
from qat_lightning.models.smollm2 import smollm2_gguf_path  # noqa: E402
from qat_lightning.quant import as_quant_config, quantize_model  # noqa: E402

KV_BITS = {"f16": 16, "q8_0": 8, "q4_0": 4}
# a tiny random Llama that a GGUF can hold: SmolLM2's tokenizer and vocabulary, one KV head of dim 64
TINY_LLAMA = ["model.tokenizer=smollm2", "model.vocab_size=49152", "model.hidden_size=128", "model.num_heads=2",
              "model.num_kv_heads=1", "model.intermediate_size=256"]


def _q4_0(kv: str = "q8_0", **kw):
    """conf/quant/q4_0.yaml (composed alone, as the `quant` group) with the KV cache of `kv`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = as_quant_config(compose(config_name="quant/q4_0").quant)
    return dataclasses.replace(cfg, kv_bits=KV_BITS[kv], **kw)


def _tiny(tie: bool = True, seed: int = 0):
    config = build_tiny_config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1,
                               tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return build_tiny_model(config, seed=seed)


def _ids(n: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed))


def _agreement(engine: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    log_r, log_e = F.log_softmax(ref, -1), F.log_softmax(engine, -1)
    return {
        "kl": (log_r.exp() * (log_r - log_e)).sum(-1).mean().item(),
        "rel_max": ((engine - ref).abs().max() / ref.abs().max()).item(),
        "top1": (engine.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tied tiny teacher, its q4_0 student's GGUF and its F16 GGUF."""
    root = tmp_path_factory.mktemp("engine")
    model = _tiny()
    student = quantize_model(model, _q4_0())
    export_gguf(student, None, root / "q4_0.gguf", source_gguf=smollm2_gguf_path())
    export_gguf(model, None, root / "f16.gguf", source_gguf=smollm2_gguf_path(), dtype="f16")
    return model, root


def test_the_installed_engine_has_no_amx_kernels():
    """`make install` rebuilds an AMX wheel found in pip's cache; an AMX build segfaults below on AMX CPUs."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, f"llama.cpp was built with AMX (rerun make install): {info}"
    assert not engine_has_amx()


def test_an_amx_build_is_refused_with_a_clear_error_instead_of_a_segfault(tiny_files, monkeypatch):
    import llama_cpp

    _, root = tiny_files
    real = llama_cpp.llama_print_system_info()
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: real.rstrip(b"| ") + b" | AMX_INT8 = 1 | ")
    monkeypatch.delenv("QAT_LLAMACPP_ALLOW_AMX", raising=False)
    with pytest.raises(EngineUnavailable, match=r"built with AMX kernels.*llama.cpp#20824.*-mno-amx-int8"):
        load_gguf(root / "f16.gguf", n_ctx=128)


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_llamacpp_logits_agree_with_the_fake_quant_student(tiny_files, kv):
    model, root = tiny_files
    ids = _ids()
    with torch.inference_mode():
        ref = quantize_model(model, _q4_0(kv))(ids[None]).logits[0]  # (T, V)
    llm = load_gguf(root / "q4_0.gguf", n_ctx=128, kv_type=kv, model=model)
    out = llamacpp_logits(llm, ids)
    llm.close()
    a = _agreement(out, ref)
    assert a["kl"] < 2e-5 and a["rel_max"] < 0.02 and a["top1"] >= 0.98, a


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_rotated_r1_r2_student_runs_in_llamacpp_as_a_plain_untied_llama(tmp_path, kv):
    """#17 in the deployed format: QuaRot's R1+R2 leave a plain (now untied) Llama; its Q4_0 student's GGUF
    holds an `output.weight` and llama.cpp computes the fake-quant student's logits, as for an unrotated one."""
    from qat_lightning.rotate import rotate_model

    rotated = rotate_model(_tiny(), r1=True, r2=True, seed=0)
    assert not rotated.config.tie_word_embeddings
    student = quantize_model(rotated, _q4_0(kv))
    export_gguf(student, None, tmp_path / "rot.gguf", source_gguf=smollm2_gguf_path())
    assert "output.weight" in {t.name for t in GGUFReader(tmp_path / "rot.gguf").tensors}
    ids = _ids(seed=4)
    with torch.inference_mode():
        ref = student(ids[None]).logits[0]
    llm = load_gguf(tmp_path / "rot.gguf", n_ctx=128, kv_type=kv, model=rotated)
    out = llamacpp_logits(llm, ids)
    llm.close()
    a = _agreement(out, ref)
    assert a["kl"] < 2e-5 and a["rel_max"] < 0.02 and a["top1"] >= 0.98, a


@pytest.mark.parametrize("kv", ["f16", "q4_0"])
def test_a_k_proj_bias_runs_in_llamacpp_as_attn_k_bias(tmp_path, kv):
    """Key centering's k_proj bias is llama.cpp's `attn_k.bias`, added before RoPE in the permuted row order:
    the engine computes the biased student's logits (a random bias, large enough to move them)."""
    from qat_lightning.export.gguf import read_gguf_tensor

    model = _tiny(seed=5)
    student = quantize_model(model, _q4_0(kv))
    export_gguf(student, None, tmp_path / "plain.gguf", source_gguf=smollm2_gguf_path())
    gen = torch.Generator().manual_seed(7)
    for layer in student.model.layers:
        k_proj = layer.self_attn.k_proj
        k_proj.bias = torch.nn.Parameter(torch.randn(k_proj.out_features, generator=gen), requires_grad=False)
    export_gguf(student, None, tmp_path / "biased.gguf", source_gguf=smollm2_gguf_path())
    bias = student.model.layers[1].self_attn.k_proj.bias
    assert torch.equal(read_gguf_tensor(tmp_path / "biased.gguf", "blk.1.attn_k.bias"), bias.float())
    ids = _ids(seed=6)
    with torch.inference_mode():
        ref = student(ids[None]).logits[0]
    outs = {}
    for name in ("biased", "plain"):
        llm = load_gguf(tmp_path / f"{name}.gguf", n_ctx=128, kv_type=kv, model=model)
        outs[name] = llamacpp_logits(llm, ids)
        llm.close()
    a = _agreement(outs["biased"], ref)
    assert a["kl"] < 2e-5 and a["rel_max"] < 0.02 and a["top1"] >= 0.98, a
    assert _agreement(outs["plain"], ref)["kl"] > 10 * a["kl"]


def test_kv_rotation_off_in_the_engine_matches_kv_hadamard_false(tiny_files, monkeypatch):
    """LLAMA_ATTN_ROT_DISABLE=1 is `kv_hadamard: false`: the emulation follows llama.cpp's switch."""
    model, root = tiny_files
    ids = _ids(seed=1)
    monkeypatch.setitem(os.environ, "LLAMA_ATTN_ROT_DISABLE", "1")
    llm = load_gguf(root / "q4_0.gguf", n_ctx=128, kv_type="q4_0")
    out = llamacpp_logits(llm, ids)
    llm.close()
    with torch.inference_mode():
        off = quantize_model(model, _q4_0("q4_0", kv_hadamard=False))(ids[None]).logits[0]
        on = quantize_model(model, _q4_0("q4_0"))(ids[None]).logits[0]
    a_off, a_on = _agreement(out, off), _agreement(out, on)
    assert a_off["kl"] < 2e-5 and a_off["top1"] >= 0.98, a_off
    assert a_on["kl"] > 1.2 * a_off["kl"], (a_on, a_off)


def test_f16_teacher_gguf_runs_like_the_teacher(tiny_files):
    model, root = tiny_files
    ids = _ids(64, seed=2)
    llm = load_gguf(root / "f16.gguf", n_ctx=64)
    out = llamacpp_logits(llm, ids)
    llm.close()
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    a = _agreement(out, ref)
    assert a["kl"] < 1e-5 and a["top1"] >= 0.98, a


def test_llamacpps_own_q4_0_of_the_f32_teacher_is_our_rtn_byte_for_byte(tmp_path):
    """The engine is the reference: llama-quantize writes exactly our RTN student's codes and scales."""
    model = _tiny(tie=False, seed=3)
    student = quantize_model(model, _q4_0())
    export_gguf(student, None, tmp_path / "rtn.gguf", source_gguf=smollm2_gguf_path())
    export_gguf(model, None, tmp_path / "f32.gguf", source_gguf=smollm2_gguf_path(), dtype="f32")
    llamacpp_quantize(tmp_path / "f32.gguf", tmp_path / "ptq.gguf", "q4_0", output_type="q8_0", token_embd_type="q8_0")
    ours = {t.name: t for t in GGUFReader(tmp_path / "rtn.gguf").tensors}
    engine = {t.name: t for t in GGUFReader(tmp_path / "ptq.gguf").tensors}
    assert sorted(ours) == sorted(engine)
    for name, t in ours.items():
        assert t.tensor_type == engine[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(engine[name].data).view(np.uint8)), name


def test_truncated_file_is_refused_before_llamacpp_sees_it(tiny_files, tmp_path):
    _, root = tiny_files
    data = (root / "q4_0.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(tmp_path / "cut.gguf")
    narrow = build_tiny_model(build_tiny_config(vocab_size=49152, num_heads=2, num_kv_heads=1, hidden_size=64))
    with pytest.raises(GGUFError, match="n_embd: file 128, model 64"):
        load_gguf(root / "q4_0.gguf", model=narrow)


def test_scores_use_the_harness_windows_and_speed_is_measured(tiny_files, tmp_path):
    shared_data_or_skip()
    from qat_lightning.eval import corpus_ids
    from qat_lightning.eval.ppl import perplexity
    from qat_lightning.models import load_model

    _, tokenizer = load_model({"source": "tiny", "tokenizer": "smollm2", "hidden_size": 128, "num_heads": 2,
                               "num_kv_heads": 1, "intermediate_size": 256})
    model, root = tiny_files
    cfg = EvalConfig(tasks=["wikitext2"], seq_len=64, max_windows=3)
    scores = llamacpp_scores(root / "f16.gguf", tokenizer, cfg, teacher=model)
    ref = perplexity(model, corpus_ids(tokenizer, "wikitext2"), 64, max_windows=3)["ppl"]
    assert set(scores) == {"wikitext2_ppl", "wikitext2_kl", "wikitext2_top1_agreement"}
    assert scores["wikitext2_ppl"] == pytest.approx(ref, rel=1e-3) and scores["wikitext2_kl"] < 1e-5
    assert kv_type_of(_q4_0("q4_0")) == "q4_0" and kv_type_of(_q4_0("f16")) == "f16"
    s = llamacpp_speed(root / "q4_0.gguf", kv_type="q4_0", context=64, n_gen=8)
    assert s["prompt_tokens"] == 56 and s["decode_tokens_per_s"] > 0 and s["prompt_tokens_per_s"] > 0
    assert kv_cache_bytes(512, 30, 3, 64, "q4_0") == 2 * 30 * 512 * 6 * 18  # 18 bytes per block of 32
    assert kv_cache_bytes(512, 30, 3, 64, "f16") == 2 * 30 * 512 * 192 * 2


def test_per_window_nll_is_the_teachers_window_by_window(tiny_files):
    """`window_nll` (what benchmarks/compare_windows.py pairs) must be each window's own NLL, in window order."""
    from qat_lightning.eval.ppl import token_nll

    model, root = tiny_files
    windows = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(3))
    llm = load_gguf(root / "f16.gguf", n_ctx=64)
    try:
        r = score_windows(llm, windows)
    finally:
        llm.close()
    with torch.inference_mode():
        ref = token_nll(model(input_ids=windows).logits, windows).double().mean(-1)  # (4,)
    assert len(r["window_nll"]) == 4 and r["num_tokens"] == 4 * 47
    assert torch.tensor(r["window_nll"]) == pytest.approx(ref, rel=1e-3)
    assert sum(r["window_nll"]) / 4 == pytest.approx(r["nll"], rel=1e-12)
    assert max(ref) - min(ref) > 1e-2  # the windows differ, so a shuffled order would fail


@pytest.mark.slow
def test_smollm2_rtn_q4_0_scores_the_same_in_llamacpp_and_our_harness(tmp_path):
    """SmolLM2's q4_0 RTN student: llama.cpp's perplexity of its GGUF equals our fake-quant harness' (4 windows)."""
    shared_data_or_skip()
    from qat_lightning.eval import corpus_ids
    from qat_lightning.eval.ppl import perplexity
    from qat_lightning.models import load_model

    teacher, tokenizer = load_model({"source": "smollm2"})
    cfg = EvalConfig(tasks=["wikitext2"], seq_len=512, max_windows=4)
    ids = corpus_ids(tokenizer, "wikitext2")
    student = quantize_model(teacher, _q4_0("q8_0"))
    stats = export_gguf(student, tokenizer, tmp_path / "s.gguf", source_gguf=smollm2_gguf_path())
    assert stats["tensor_types"] == {"f32": 61, "q4_0": 210, "q8_0": 1}
    engine = llamacpp_scores(tmp_path / "s.gguf", tokenizer, cfg, kv_type="q8_0", model=teacher)["wikitext2_ppl"]
    ours = perplexity(student, ids, 512, max_windows=4)["ppl"]
    assert engine == pytest.approx(ours, rel=5e-3)


def test_a_q4_0_run_exports_its_gguf_and_scores_it_beside_the_engines_own_rows(tmp_path, capsys):
    """generate → train → export.format=gguf → evaluate [gguf_f16, gguf_ptq, gguf], all scored by llama.cpp.

    The teacher's F16 file must score like the teacher (KL ~ 0), llama.cpp's own Q4_0 of it must be a
    different model from the F16 one, and the trained student's file must hold its Q4_0 codes.
    """
    shared_data_or_skip()
    from conftest import compose, tiny_overrides
    from qat_lightning.config import validate_config
    from qat_lightning.results import load_results
    from qat_lightning.stages import RunContext, run_stages

    cfg = validate_config(compose([
        "+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), *TINY_LLAMA, "quant=q4_0", "logger=none",
        "trainer.max_steps=2", "stages=[generate,train,export,evaluate]", "export.format=gguf",
        f"export.gguf_source={smollm2_gguf_path()}", "evaluate.methods=[gguf_f16,gguf_ptq,gguf]",
        "evaluate.tasks=[wikitext2]", "evaluate.seq_len=64", "evaluate.max_windows=2"]))
    run_stages(RunContext(cfg, tmp_path / "run"))
    res = load_results(tmp_path / "run")
    assert res["evaluate/gguf_f16/wikitext2_kl"] < 1e-4
    assert res["evaluate/gguf_ptq/wikitext2_kl"] > 10 * res["evaluate/gguf_f16/wikitext2_kl"]
    assert res["evaluate/gguf/wikitext2_ppl"] > 1
    (engine_dir,) = (tmp_path / "data" / "gguf").iterdir()
    assert sorted(p.name for p in engine_dir.iterdir()) == ["teacher-f16.gguf", "teacher-q4_0.gguf"]
    types = {t.tensor_type.name for t in GGUFReader(tmp_path / "run" / "export" / "model.gguf").tensors}
    assert types == {"F32", "Q4_0", "Q8_0"}
    out = capsys.readouterr().out
    assert "| gguf_ptq |" in out and f"llama-cli -m {tmp_path}/run/export/model.gguf -fa on -ctk q8_0 -ctv q8_0" in out
    assert (tmp_path / "run" / "export" / "Modelfile").read_text() == "FROM ./model.gguf\n"


def test_a_key_centered_export_writes_attn_k_biases_and_leaves_the_student_alone(tmp_path):
    """export.key_center_pairs on a q4_0-KV run: the GGUF gains one attn_k.bias a layer (keys centered on the
    generated corpus), the saved student keeps its bias-free k_proj, llama.cpp scores the file like the student
    (a tiny random model's key offsets are small, so centering barely moves it) and the run records what was done."""
    shared_data_or_skip()
    from safetensors.torch import load_file

    from conftest import compose, tiny_overrides
    from qat_lightning.config import validate_config
    from qat_lightning.results import load_results
    from qat_lightning.stages import RunContext, run_stages

    cfg = validate_config(compose([
        "+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), *TINY_LLAMA, "quant=q4_0_kv4", "logger=none",
        "trainer.max_steps=2", "stages=[generate,train,export,evaluate]", "export.format=gguf",
        "export.key_center_pairs=4", f"export.gguf_source={smollm2_gguf_path()}",
        "evaluate.methods=[qat,gguf]", "evaluate.tasks=[wikitext2]", "evaluate.seq_len=64", "evaluate.max_windows=2"]))
    run_stages(RunContext(cfg, tmp_path / "run"))
    res = load_results(tmp_path / "run")
    # the default 128 calibration sequences, from a corpus of 16: all 16 are used
    assert res["export/key_center/n_pairs"] == 4 and res["export/key_center/calib_sequences"] == 16
    names = {t.name for t in GGUFReader(tmp_path / "run" / "export" / "model.gguf").tensors}
    assert sorted(n for n in names if n.endswith(".bias")) == [f"blk.{i}.attn_k.bias" for i in range(2)]
    assert not any(k.endswith(".bias") for k in load_file(tmp_path / "run" / "student" / "student.safetensors"))
    assert res["evaluate/gguf/wikitext2_ppl"] == pytest.approx(res["evaluate/qat/wikitext2_ppl"], rel=2e-2)


def test_engine_baselines_refuse_a_kv_width_llamacpp_lacks(tmp_path):
    from conftest import compose, tiny_overrides
    from qat_lightning.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="no KV cache type for kv_bits=6"):
        validate_config(compose(["+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), "quant.kv_bits=6",
                                 "evaluate.methods=[gguf_ptq]"]))


@pytest.mark.slow  # ~50 s: a whole LSQ Q4_0 run; the preset's unit test (test_ggml.py) stays in `make test`
def test_a_learned_scale_q4_0_run_scores_the_same_in_llamacpp_and_our_harness(tmp_path):
    """quant=q4_0_kv4_lsq end to end: the trained block scales move off llama.cpp's d = m / -8, go into the
    GGUF as they are, and llama.cpp (KV q4_0) computes the student's perplexity: a learned d is still Q4_0."""
    shared_data_or_skip()
    from conftest import compose, tiny_overrides
    from qat_lightning.config import validate_config
    from qat_lightning.distill.student_io import load_saved_student
    from qat_lightning.quant import ggml, iter_quant_linears
    from qat_lightning.results import load_results
    from qat_lightning.stages import RunContext, run_stages

    cfg = validate_config(compose([
        "+exp=tiny_w4a8kv4", *tiny_overrides(tmp_path), *TINY_LLAMA, "quant=q4_0_kv4_lsq", "logger=none",
        "trainer.max_steps=3", "optim.lr=1e-3", "optim.scale_lr=1e-3", "stages=[generate,train,export,evaluate]",
        "export.format=gguf", f"export.gguf_source={smollm2_gguf_path()}", "evaluate.methods=[qat,gguf]",
        "evaluate.tasks=[wikitext2]", "evaluate.seq_len=64", "evaluate.max_windows=2"]))
    run_stages(RunContext(cfg, tmp_path / "run"))
    res = load_results(tmp_path / "run")
    assert res["evaluate/gguf/wikitext2_ppl"] == pytest.approx(res["evaluate/qat/wikitext2_ppl"], rel=1e-2)
    model = build_tiny_model(build_tiny_config(vocab_size=49152, hidden_size=128, intermediate_size=256,
                                               num_heads=2, num_kv_heads=1))
    student = load_saved_student(model, tmp_path / "run" / "student")
    up = dict(iter_quant_linears(student))["model.layers.0.mlp.up_proj"]
    own = ggml.ggml_scale(ggml.blocks_of(up.weight.detach()), "q4_0")
    assert up.weight_scale.shape == own.shape and not torch.allclose(up.weight_scale, own, rtol=1e-3)
    types = {t.tensor_type.name for t in GGUFReader(tmp_path / "run" / "export" / "model.gguf").tensors}
    assert types == {"F32", "Q4_0", "Q8_0"}
