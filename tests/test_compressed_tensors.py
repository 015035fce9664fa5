"""export.format=compressed-tensors: the checkpoint holds the student's own codes and scales, transformers loads
it and computes the student's function (W4A16/W8A16 exactly; W8A8 up to compressed-tensors' activation grid),
and every setting the format cannot hold is refused with one line, at start-up and at export.

Measured on these tiny models (fp32, CPU; numbers in docs/COMPRESSED_TENSORS.md):
* W4A16 / W8A16 (channel, group, mixed, LSQ): logits of the loaded checkpoint == the student's,
  max |diff| = 0; dequantized weights == `quantized_weight()` bit for bit (also in bfloat16).
* W8A8: the loaded model == its weights with compressed-tensors' documented dynamic int8 per-token grid
  (scale amax/127.5, codes -128..127) exactly; against the student (scale amax/127, codes -127..127, the grid
  vLLM's int8 kernel also uses) max |logit diff| 0.36 on logits up to 4.8, mean KL 1.1e-3 (the student's own
  A8 vs A16 differ by 0.31 / 5.8e-4: compressed-tensors' grid is another A8 rounding of the same size).
* fp32 student written as float16 (`dtype="float16"`): weights within |w| * 2^-10 of the student's (scales
  rounded once to fp16); logits max |diff| 0.019, KL 3.6e-6 (W4 group 32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install compressed-tensors)")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402

from qat_lightning.config import ConfigError, validate_config  # noqa: E402
from qat_lightning.export.hf_compressed import compressed_tensors_scheme, export_compressed_tensors  # noqa: E402
from qat_lightning.models.tiny import build_tiny_config, build_tiny_model  # noqa: E402
from qat_lightning.quant import iter_quant_linears, quantize_model  # noqa: E402
from qat_lightning.quant.kv import iter_kv_quantizers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
W8A8_MAX_ABS = 0.5  # measured 0.357 (logits up to 4.8)
W8A8_KL = 5e-3  # measured 1.06e-3 (mean per-token KL, student || checkpoint)

A16 = {
    "w4_channel": dict(w_bits=4, a_bits=16, kv_bits=16),
    "w4_group32": dict(w_bits=4, a_bits=16, kv_bits=16, w_granularity="group", w_group_size=32),
    "w8_channel": dict(w_bits=8, a_bits=16, kv_bits=16),
    "w4_lsq": dict(w_bits=4, a_bits=16, kv_bits=16, lsq=True),
    "w4_skip": dict(w_bits=4, a_bits=16, kv_bits=16, overrides=[{"pattern": r"layers\.0\.mlp\.up_proj", "skip": True}]),
    "w4_tied": dict(w_bits=4, a_bits=16, kv_bits=16),
    "w4_qwen2": dict(w_bits=4, a_bits=16, kv_bits=16, w_granularity="group", w_group_size=32),
    "w4_mixed": dict(w_bits=4, a_bits=16, kv_bits=16, overrides=[
        {"pattern": "down_proj", "w_bits": 8}, {"pattern": r"layers\.1\.self_attn\.o_proj", "skip": True}]),
}
W8A8 = dict(w_bits=8, a_bits=8, kv_bits=8)


def tiny_student(qcfg: dict, dtype: torch.dtype = torch.float32, seed: int = 0, arch: str = "llama",
                 tie: bool = False):
    model = build_tiny_model(build_tiny_config(arch, tie_word_embeddings=tie), seed=seed)
    with torch.no_grad():  # larger weights than the 0.02 init so logits and codes are spread out
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    rope = model.model.rotary_emb  # `.to(dtype)` casts RoPE's frequencies too; from_pretrained keeps them float32
    freqs = {buf: getattr(rope, buf).clone() for buf in ("inv_freq", "original_inv_freq")}
    model = model.to(dtype)
    for buf, value in freqs.items():
        setattr(rope, buf, value)
    student = quantize_model(model, qcfg)
    if student.quant_config.lsq:  # move the learned steps off their MinMax init, as training does
        with torch.no_grad():
            for _, m in iter_quant_linears(student):
                if m.weight_scale is not None:
                    m.weight_scale.mul_(torch.empty_like(m.weight_scale).uniform_(0.8, 1.1, generator=gen))
    return student.eval()


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def decompressed_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as compressed-tensors' own decompressor rebuilds it from the files."""
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    qcfg = QuantizationConfig.model_validate(cfg)
    tensors = load_file(str(path / "model.safetensors"))
    names = {k.rsplit(".", 1)[0] for k in tensors if k.endswith("weight_scale")}
    out = {}
    for name in names:
        scheme = next(g for g in qcfg.config_groups.values() if name in g.targets or g.targets == ["Linear"])
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        out[name] = BaseCompressor.get_value_from_registry(scheme.format).decompress(state, scheme)["weight"]
    return out


# ---- what is written ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(A16))
def test_a16_checkpoint_loads_and_computes_the_student(tmp_path, name):
    student = tiny_student(A16[name], arch="qwen2" if name == "w4_qwen2" else "llama", tie=name == "w4_tied")
    stats = export_compressed_tensors(student, tmp_path / "ct")
    assert stats["format"] == "compressed-tensors" and stats["kv_cache"] == "not quantized"
    assert stats["scheme"] == ("W4A16+W8A16" if name == "w4_mixed" else "W8A16" if name == "w8_channel" else "W4A16")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["kv_cache_scheme"] is None
    assert "lm_head" in qc["ignore"]
    groups = list(qc["config_groups"].values())
    w = groups[0]["weights"]
    assert groups[0]["input_activations"] is None and w["type"] == "int" and not w["dynamic"]
    assert w["symmetric"]
    grouped = "group32" in name or name == "w4_qwen2"
    assert (w["strategy"], w["group_size"]) == (("group", 32) if grouped else ("channel", None))
    if name == "w4_mixed":  # one group per setting, targeted by exact name; the skipped o_proj is ignored
        assert len(groups) == 2 and "model.layers.1.self_attn.o_proj" in qc["ignore"]
        assert all(t.startswith("model.layers.") for g in groups for t in g["targets"])
    else:
        assert len(groups) == 1 and groups[0]["targets"] == ["Linear"]
    if name == "w4_skip":
        assert qc["ignore"] == ["model.layers.0.mlp.up_proj", "lm_head"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert ("lm_head.weight" in tensors) == (name != "w4_tied")  # a tied head is stored once, as the embedding
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == (name == "w4_qwen2")

    # the student's own weights, bit for bit, from compressed-tensors' decompressor
    mods = dict(iter_quant_linears(student))
    dec = decompressed_weights(tmp_path / "ct")
    assert set(dec) == {n for n, m in mods.items() if m.weight_spec.enabled}
    for n, wt in dec.items():
        assert torch.equal(wt, mods[n].quantized_weight()), n

    # transformers' default load (compressed modules, decompressed on the first forward) == the student
    ids = token_ids()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    got, ref = logits(hf, ids), logits(student, ids)
    assert torch.equal(got, ref), (got - ref).abs().max().item()  # measured max |diff| = 0
    hf_mods = dict(hf.named_modules())
    for n, m in mods.items():
        assert torch.equal(hf_mods[n].weight, m.quantized_weight() if m.weight_spec.enabled else m.weight), n


def test_w8a8_checkpoint_int8_weights_and_dynamic_token_activations(tmp_path):
    student = tiny_student(W8A8)
    stats = export_compressed_tensors(student, tmp_path / "ct")
    assert stats["scheme"] == "W8A8" and stats["quant_format"] == "int-quantized"
    assert stats["kv_cache"].startswith("left out")  # the student's 8-bit KV cache is not in the format
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["format"] == "int-quantized" and qc["kv_cache_scheme"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "strategy", "symmetric", "dynamic")} == {
        "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}
    assert {k: group["input_activations"][k] for k in ("num_bits", "strategy", "symmetric", "dynamic")} == {
        "num_bits": 8, "strategy": "token", "symmetric": True, "dynamic": True}
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    mods = dict(iter_quant_linears(student))
    for n, wt in decompressed_weights(tmp_path / "ct").items():
        assert torch.equal(wt, mods[n].quantized_weight()), n

    ids = token_ids()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # compressed-tensors' own A8 in the forward
    got = logits(hf, ids)

    # (a) what transformers runs is exactly the exported weights with compressed-tensors' documented dynamic
    # per-token int8 grid: scale = amax / 127.5, codes clamp(round(x / scale), -128, 127)
    def per_token_int8(qmax: float, lo: int):
        def hook(module, args):
            x = args[0]
            s = x.abs().amax(-1, keepdim=True) / qmax
            return (torch.clamp(torch.round(x / s), lo, 127) * s,)
        return hook

    def dense_with(hook):
        dense = AutoModelForCausalLM.from_pretrained(
            tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True))
        for n, m in dense.named_modules():
            if n in mods:
                m.register_forward_pre_hook(hook)
        return dense

    assert torch.equal(logits(dense_with(per_token_int8(127.5, -128)), ids), got)

    # (b) the student's A8 grid is amax / 127 with codes -127..127 (vLLM's dynamic int8 kernel: scale amax/127,
    # round(x * 127 / amax)): on the checkpoint's weights it gives the student's logits
    for _, kvq in iter_kv_quantizers(student):
        kvq.quant_enabled = False  # the KV cache is not in the checkpoint
    ref = logits(student, ids)
    assert torch.allclose(logits(dense_with(per_token_int8(127.0, -127)), ids), ref, atol=1e-5, rtol=0)

    # (c) transformers' forward against the student: only the activation grid differs
    max_abs, mean_kl = (got - ref).abs().max().item(), kl(ref, got)
    assert 0 < max_abs < W8A8_MAX_ABS and mean_kl < W8A8_KL, (max_abs, mean_kl)


def test_bfloat16_student_is_exact(tmp_path):
    """bf16: codes and scales are the student's bf16 ones (8-bit codes times a bf16 scale are not exact in bf16,
    so re-quantizing the fake-quantized weight could move a code: the export hands the compressor exact values)."""
    for name, q in (("w8", A16["w8_channel"]), ("w4g", A16["w4_group32"])):
        student = tiny_student(q, dtype=torch.bfloat16)
        export_compressed_tensors(student, tmp_path / name)
        mods = dict(iter_quant_linears(student))
        for n, wt in decompressed_weights(tmp_path / name).items():
            assert wt.dtype == torch.bfloat16 and torch.equal(wt, mods[n].quantized_weight()), n
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert next(hf.parameters()).dtype == torch.bfloat16
        assert torch.equal(logits(hf, token_ids()), logits(student, token_ids()))


def test_float16_checkpoint_of_a_float32_student_rounds_scales_once(tmp_path):
    student = tiny_student(A16["w4_group32"])
    export_compressed_tensors(student, tmp_path / "ct", dtype="float16")
    mods = dict(iter_quant_linears(student))
    for n, wt in decompressed_weights(tmp_path / "ct").items():
        ref = mods[n].quantized_weight()
        # |code| <= 7 times half an fp16 ulp of the scale (relative 2^-11), plus the fp16 product's own rounding
        bound = ref.abs() * 2.0**-10 + 1e-7
        assert wt.dtype == torch.float16 and ((wt.float() - ref).abs() <= bound).all(), n


def test_tokenizer_is_saved_and_export_replaces_old_folder(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(259)} | {"<unk>": 259}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>")
    student = tiny_student(A16["w4_channel"])
    out = tmp_path / "ct"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_compressed_tensors(student, out, tokenizer=tok)
    assert not (out / "stale.txt").exists()
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("t5") == 5
    from qat_lightning.models.byte_tokenizer import ByteTokenizer

    export_compressed_tensors(student, out, tokenizer=ByteTokenizer())  # nothing to save: no error
    assert (out / "config.json").exists() and json.loads((out / "qat_export.json").read_text())["scheme"] == "W4A16"


# ---- what is refused ------------------------------------------------------------------------------
@pytest.mark.parametrize("qcfg, needle", [
    (dict(w_bits=4, a_bits=8, kv_bits=4), "4-bit KV cache cannot be held"),
    (dict(w_bits=4, a_bits=16, kv_bits=16, overrides=[{"pattern": "v_proj", "kv_bits": 6}]), "6-bit KV cache"),
    (dict(w_bits=4, a_bits=8, kv_bits=8, estimator="ggml", w_granularity="group", w_group_size=32,
          a_granularity="group", a_group_size=32, kv_granularity="group", kv_group_size=32), "estimator 'ggml'"),
    (dict(w_bits=4, a_bits=4, kv_bits=16), "4-bit activations"),
    (dict(w_bits=4, a_bits=6, kv_bits=16), "6-bit activations"),
    (dict(w_bits=4, a_bits=8, kv_bits=16), "W4A8 int path"),
    (dict(w_bits=2, a_bits=16, kv_bits=16, w_estimator="seq"), "2-bit weights"),
    (dict(w_bits=3, a_bits=16, kv_bits=16), "3-bit weights"),
    (dict(w_bits=4, a_bits=16, kv_bits=16, w_granularity="tensor"), "per-tensor weight scales"),
    (dict(w_bits=4, a_bits=16, kv_bits=16, symmetric=False), "asymmetric weights"),
    (dict(w_bits=8, a_bits=8, kv_bits=16, a_granularity="tensor"), "per token"),
    (dict(w_bits=8, a_bits=8, kv_bits=16, a_symmetric=False), "per token"),
    (dict(w_bits=8, a_bits=8, kv_bits=16, estimator="clip"), "per token"),
    (dict(w_bits=4, a_bits=16, kv_bits=16, quantize_lm_head=True), "quantize_lm_head"),
    (dict(w_bits=4, a_bits=16, kv_bits=16, quantize_embeddings=True), "quantize_embeddings"),
    (dict(w_bits=16, a_bits=16, kv_bits=16), "nothing is quantized"),
])
def test_refused_settings_one_line(qcfg, needle):
    with pytest.raises(ValueError, match=needle) as info:
        compressed_tensors_scheme(qcfg)
    msg = str(info.value)
    assert msg.startswith("export.format=compressed-tensors: ") and "\n" not in msg


def test_scheme_names():
    assert compressed_tensors_scheme(A16["w4_channel"]) == "W4A16"
    assert compressed_tensors_scheme(A16["w4_mixed"]) == "W4A16+W8A16"
    assert compressed_tensors_scheme(W8A8) == "W8A8"  # the KV8 cache is left out, not refused
    assert compressed_tensors_scheme(A16["w4_lsq"]) == "W4A16"
    with pytest.raises(ValueError, match="online rotations"):
        compressed_tensors_scheme(A16["w4_channel"], rotation={"r1": True, "r4": True})


def test_export_refuses_kv4_student_and_online_rotation_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="4-bit KV cache cannot be held"):
        export_compressed_tensors(tiny_student(dict(w_bits=4, a_bits=16, kv_bits=4)), tmp_path / "kv4")
    assert not (tmp_path / "kv4").exists()

    from qat_lightning.rotate import rotate_model

    model = build_tiny_model(build_tiny_config())
    student = quantize_model(rotate_model(model, r1=True, r2=True, r4=True), A16["w4_channel"])
    with pytest.raises(ValueError, match="online rotations"):
        export_compressed_tensors(student, tmp_path / "rot")
    assert not (tmp_path / "rot").exists()


def test_config_refuses_at_start_up(tiny_cfg):
    export = ("stages=[generate,train,export]", "export.format=compressed-tensors")
    with pytest.raises(ConfigError, match="4-bit KV cache cannot be held"):
        validate_config(tiny_cfg(*export))  # tiny_w4a8kv4
    with pytest.raises(ConfigError, match="online rotations"):
        validate_config(tiny_cfg(*export, "quant=w4", "init=quarot", "methods.quarot.r4=true"))
    with pytest.raises(ConfigError, match="score the student"):
        validate_config(tiny_cfg(*export, "quant=w4", "stages=[generate,train,export,evaluate]",
                                 "evaluate.methods=[export]"))
    assert validate_config(tiny_cfg(*export, "quant=w4")).export.is_compressed_tensors
    assert validate_config(tiny_cfg(*export, "quant=w8a8kv8")).export.is_compressed_tensors


def test_cli_kv4_exits_2_before_loading_a_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qat_lightning", "+exp=tiny_w4a8kv4", "stages=[generate,train,export]",
         "export.format=compressed-tensors", f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tmp_path}/data",
         f"paths.cache_dir={tmp_path}/cache"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: export.format=compressed-tensors: ") and "KV cache" in lines[-1]
    assert not (tmp_path / "data" / "generated").exists()
