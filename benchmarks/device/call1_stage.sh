#!/bin/bash
# Device call 1 of 2 (benchmarks/device/README.md): stage the GGUF's first part and our pure-Python packages
# on the lent machine; with `smoke`, also run the CLI end to end on the tiny model there (teacher on the GPU:
# generation, GPTQ after R1-R4, 10 QAT steps, KL and WikiText-2), ~60 s, worth it whenever the code changed.
set -u
T0=$(date +%s)
mkdir -p /root/stage /tmp/site /root/data
cp .gpu1/gguf.part-aa /root/stage/ && cp -r .gpu1/data/* /root/data/ && tar -xJf .gpu1/site.tar.xz -C /tmp/site || exit 3
export USE_HUB_KERNELS=NO PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=offline QAT_DATA_DIR=/root/data
nvidia-smi -L
python3 -c "import sys, torch, transformers, lightning, hydra, gguf; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available(), transformers.__version__, lightning.__version__)" || exit 4
if [ "${1:-}" = smoke ]; then
  OMP_NUM_THREADS=8 timeout 150 python3 -m qat_lightning +exp=smollm2_w4a8kv4_rot model=tiny logger=csv \
    seed=1 data.seed=1 methods.quarot_gptq.seed=1 trainer=gpu trainer.precision=32-true trainer.devices=1 \
    trainer.max_steps=10 generation.num_sequences=32 generation.max_length=48 generation.batch_size=32 \
    generation.shard_size=32 data.block_size=32 paths.data_dir=/root/tinydata hydra.run.dir=/root/tiny \
    "stages=[generate,train,evaluate]" "evaluate.methods=[quarot_gptq,qat]" "evaluate.tasks=[kl,wikitext2]" \
    > $OUT/tiny.log 2>&1 || { echo "smoke test failed:"; grep -E "Error|Traceback" -A3 $OUT/tiny.log | tail -20; exit 5; }
  grep -A5 "^### " $OUT/tiny.log
fi
touch /root/staged
echo "staged after $(( $(date +%s) - T0 )) s: issue call 2 now (the machine goes back after 30 s idle)"
