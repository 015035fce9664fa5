"""What one run owns across its stages: the context (config, models, corpus, results) and its logger."""

from qat_lightning.run.context import RunContext, global_rank, world_size

__all__ = ["RunContext", "global_rank", "world_size"]
