"""The layout of one cohort step's concatenated batch, shared by the stacked layers (`raysim.lora.cohort`)
and the per-client dropout (`raysim.lora.cohort_dropout`). No raysim imports."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (the counter-based per-client dropout kernel on CUDA needs it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class CohortContext:
    """Layout of the concatenated batch that the stacked layers are about to see."""

    num_slots: int
    device: torch.device
    generators: list[torch.Generator | None] = field(default_factory=list)   # per slot
    # set per step by `set_layout`
    slots: list[int] = field(default_factory=list)          # active slots, in row order
    counts: list[int] = field(default_factory=list)         # rows per active slot
    lengths: list[int] = field(default_factory=list)        # each active client's real sequence length
    length: int = 0                                         # padded length L of the batch
    uniform: bool = True                                    # all active slots have the same row count
    all_slots: bool = True                                  # slots == 0..K-1
    slot_index: torch.Tensor | None = None                  # (K_act,) device, when not all_slots
    row_pos: torch.Tensor | None = None                     # (N,) device: active position of each row
    orig_attn: str = "sdpa"
    # counter-based dropout on CUDA (see `cuda_noise`): per row its client's seed and its row number
    # within the client's batch; `full_length` is the canonical sequence length of the offsets
    row_seed: torch.Tensor | None = None
    row_local: torch.Tensor | None = None
    full_length: int = 0
    calls: int = 0                                          # dropout calls so far in this cohort

    def set_layout(self, slots: list[int], counts: list[int], lengths: list[int],
                   slot_index: torch.Tensor | None = None, row_pos: torch.Tensor | None = None,
                   row_seed: torch.Tensor | None = None, row_local: torch.Tensor | None = None) -> None:
        """Describe the next batch: active `slots` in row order with `counts` rows and real `lengths`.

        `slot_index` / `row_pos` may be given precomputed on the device (the engine uploads all steps'
        index tensors at once); they are built here otherwise.
        """
        self.slots, self.counts, self.lengths = list(slots), list(counts), list(lengths)
        self.length = max(lengths)
        self.uniform = len(set(counts)) == 1
        self.all_slots = list(slots) == list(range(self.num_slots))
        if not self.all_slots and slot_index is None:
            slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.slot_index = None if self.all_slots else slot_index
        if not self.uniform and row_pos is None:
            row_pos = torch.repeat_interleave(torch.arange(len(slots), device=self.device),
                                              torch.tensor(counts, device=self.device))
        self.row_pos = None if self.uniform else row_pos
        self.row_seed, self.row_local = row_seed, row_local

    @property
    def counter_rng(self) -> bool:
        """Dropout from the one-launch counter-based generator (CUDA with Triton and row seeds given)."""
        return self.row_seed is not None and self.device.type == "cuda" and triton_available()

    def segments(self):
        """(slot, row start, row count, real length) for every active client."""
        start = 0
        for slot, count, length in zip(self.slots, self.counts, self.lengths):
            yield slot, start, count, length
            start += count

    def row_slots(self) -> torch.Tensor:
        """(N,) device: the stack slot of every row."""
        pos = self.row_pos
        if pos is None:
            pos = torch.arange(len(self.slots), device=self.device).repeat_interleave(self.counts[0])
        return pos if self.all_slots else self.slot_index[pos]

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a stacked (K, ...) tensor for the active slots, in row order."""
        return t if self.all_slots else t.index_select(0, self.slot_index)
