"""Post-training baselines in the student's quantizer conventions: RTN, SmoothQuant, GPTQ, AWQ, KV smoothing."""

from qat_lightning.baselines.awq import awq, awq_search_scale
from qat_lightning.baselines.calibration import capture_layer_inputs, collect_input_absmax, forward_layer
from qat_lightning.baselines.gptq import gptq, gptq_weight, input_hessian
from qat_lightning.baselines.kv_smooth import kv_smooth, kv_smooth_model
from qat_lightning.baselines.registry import BASELINE_METHODS, build_baseline
from qat_lightning.baselines.rtn import rtn
from qat_lightning.baselines.smoothquant import smooth_model, smoothquant

__all__ = [
    "BASELINE_METHODS",
    "awq",
    "awq_search_scale",
    "build_baseline",
    "capture_layer_inputs",
    "collect_input_absmax",
    "forward_layer",
    "gptq",
    "gptq_weight",
    "input_hessian",
    "kv_smooth",
    "kv_smooth_model",
    "rtn",
    "smooth_model",
    "smoothquant",
]
