"""qat-lightning: data-free quantization-aware training of LLMs (LLM-QAT)."""

import logging as _logging

# transformers imports torchao (our test oracle) eagerly when it is installed; its CUDA-only kernels and
# torch's pytree deprecations then warn on every CPU run. They say nothing about this project's work.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

__version__ = "0.1.0"
