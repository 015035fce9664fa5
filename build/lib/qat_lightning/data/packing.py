"""Cut documents into fixed-length training blocks, and the map-style Dataset that serves them.

Two ways, one knob (`DataConfig.cross_doc_boundaries`):

- packed (True): documents end to end, each followed by EOS (unless it already ends with one), cut
  every `block_size` tokens. No padding, so every token trains; this is what the reference does.
- per document (False): each document gets its own block(s); a long document is split into several
  blocks, the last block of each document is padded with attention_mask 0 (and label -100).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


def pack_documents(
    documents: Sequence[Sequence[int]],
    block_size: int,
    eos_id: int,
    cross_doc_boundaries: bool = True,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of token ids and their attention masks.

    Args:
        documents: token id lists.
        block_size: tokens per block.
        eos_id: the separator between packed documents.
        cross_doc_boundaries: pack across documents (True) or give each document its own blocks.
        pad_id: id written in padded positions (masked out anyway); default `eos_id`.

    Returns:
        input_ids (N, block_size) long and attention_mask (N, block_size) long. A packed stream's short
        tail becomes one last padded block, so a tiny corpus still yields a block.
    """
    pad = eos_id if pad_id is None else pad_id
    if cross_doc_boundaries:
        stream: list[int] = []
        for doc in documents:
            if not doc:
                continue
            stream.extend(doc)
            if doc[-1] != eos_id:
                stream.append(eos_id)
        pieces = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    else:
        pieces = [list(doc[i : i + block_size]) for doc in documents for i in range(0, len(doc), block_size)]
    input_ids = torch.full((len(pieces), block_size), pad, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(pieces), block_size), dtype=torch.long)  # (N, T)
    for row, piece in enumerate(pieces):
        input_ids[row, : len(piece)] = torch.tensor(piece, dtype=torch.long)
        attention_mask[row, : len(piece)] = 1
    return input_ids, attention_mask


class BlockDataset(Dataset):
    """Map-style blocks: works with any sampler (Lightning swaps in a DistributedSampler under DDP/FSDP)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)}")
        self.input_ids = input_ids  # (N, T)
        self.attention_mask = attention_mask  # (N, T)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, mask = self.input_ids[index], self.attention_mask[index]  # (T,), (T,)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)  # (T,) the model shifts labels itself
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())
