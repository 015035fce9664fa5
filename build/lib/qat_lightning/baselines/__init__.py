"""Post-training methods in the student's quantizer conventions, one module each (FP, RTN, SmoothQuant, GPTQ,
AWQ, KV smoothing); every module registers its `Method` (see `method.py`)."""

from qat_lightning.baselines.awq import AWQ, awq, awq_search_scale
from qat_lightning.baselines.calibration import capture_layer_inputs, collect_input_absmax, forward_layer
from qat_lightning.baselines.fp import FP
from qat_lightning.baselines.gptq import GPTQ, gptq, gptq_weight, input_hessian
from qat_lightning.baselines.kv_smooth import KVSmooth, kv_smooth, kv_smooth_model
from qat_lightning.baselines.method import Method, available_methods, build_method, method_class
from qat_lightning.baselines.rtn import RTN, rtn
from qat_lightning.baselines.smoothquant import SmoothQuant, smooth_model, smoothquant

__all__ = [
    "AWQ",
    "FP",
    "GPTQ",
    "RTN",
    "KVSmooth",
    "Method",
    "SmoothQuant",
    "available_methods",
    "awq",
    "awq_search_scale",
    "build_method",
    "capture_layer_inputs",
    "collect_input_absmax",
    "forward_layer",
    "gptq",
    "gptq_weight",
    "input_hessian",
    "kv_smooth",
    "kv_smooth_model",
    "method_class",
    "rtn",
    "smooth_model",
    "smoothquant",
]
