"""Start-up checks that need more than one config section but no weights: they run before any model loads.

Each failure is one `ConfigError` line (exit code 2), never a traceback after minutes of loading.
"""

from __future__ import annotations

from pathlib import Path

from qat_lightning.config import ConfigError, RunConfig

__all__ = ["check_experiment_args", "check_against_model", "check_run"]


def check_experiment_args(argv: list[str], conf_dir: Path) -> None:
    """`+exp=NAME` (or a sweep `+exp=a,b`) must name files of `conf/exp/`: list them otherwise."""
    available = sorted(p.stem for p in (conf_dir / "exp").glob("*.yaml"))
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if key != "exp" or not sep:
            continue
        names = [v.strip() for v in value.removeprefix("choice(").removesuffix(")").split(",")]
        bad = [n for n in names if n and n not in available]
        if bad:
            raise ConfigError(f"unknown experiment {bad[0]!r}; available: {', '.join(available)}")


def check_against_model(cfg: RunConfig) -> None:
    """What the model's config decides, read from the config alone: the family is supported, every group
    or block size divides the dim it splits."""
    from qat_lightning.models import load_model_config
    from qat_lightning.models.adapter import adapter_for

    config = load_model_config(cfg.model)
    if config is None:
        return  # not readable offline: the model load reports why
    try:
        ad = adapter_for(config)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    q = cfg.quant
    dims = ad.linear_in_features
    for i in range(ad.num_layers):
        for leaf, in_dim in dims.items():
            part = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{i}.{part}.{leaf}"
            if q.is_skipped(name):
                continue
            for what, spec in (("weight", q.weight_spec(name)), ("input", q.act_spec(name))):
                size = spec.group_size if spec.granularity == "group" else None
                if spec.enabled and size and in_dim % size:
                    raise ConfigError(f"quant: group size {size} does not divide the {what} dim {in_dim} of {leaf} "
                                      f"({cfg.model.name}); choose a divisor of {in_dim}")
    kv = q.kv_spec("model.layers.0.self_attn.k_proj", ad.head_dim)
    size = kv.group_size if kv.granularity == "group" else (kv.head_dim if kv.granularity == "head" else None)
    if kv.enabled and size and ad.kv_width % size:
        raise ConfigError(f"quant: KV {kv.granularity} size {size} does not divide n_kv * head_dim = {ad.kv_width}")


def check_run(cfg: RunConfig) -> None:
    """Every check that can run before a model is loaded (after `validate_config`)."""
    check_against_model(cfg)
    if "evaluate" in cfg.stages:
        from qat_lightning.eval.sources import check_eval_data

        try:  # every data-reading task, the eight zero-shot ones included
            check_eval_data(cfg.evaluate)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
