"""A byte-level tokenizer that needs no files: ids 0..255 are bytes, then BOS, EOS and PAD.

Tiny random models use it so text corpora (WikiText-2, HellaSwag) work offline and fast. It implements
the part of the Hugging Face tokenizer interface this project uses.
"""

from __future__ import annotations

import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids; BOS=256, EOS=257, PAD=258."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    name_or_path = "byte"
    padding_side = "right"

    @property
    def vocab_size(self) -> int:
        return 259

    def __len__(self) -> int:
        return 259

    @property
    def all_special_ids(self) -> list[int]:
        return [self.bos_token_id, self.eos_token_id, self.pad_token_id]

    @property
    def eos_token(self) -> str:
        return "</s>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, text, add_special_tokens: bool = False, return_tensors: str | None = None, **_):
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
            if return_tensors == "pt":
                out = {k: torch.tensor([v]) for k, v in out.items()}
            return out
        encoded = [self.encode(t, add_special_tokens) for t in text]
        return {"input_ids": encoded, "attention_mask": [[1] * len(ids) for ids in encoded]}

    def save_pretrained(self, path) -> None:
        """Nothing to save: the tokenizer is fully defined by this class."""
