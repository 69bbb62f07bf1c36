"""Examples before tokenisation (`RawData`), shared by every data source; no raysim imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAD_ID, CLS_ID, SEP_ID, UNK_ID = 0, 1, 2, 3      # special token ids of the synthetic and hashing vocabularies
NUM_SPECIAL_TOKENS = 4
KEY_TOKENS_PER_CLASS = 8                         # synthetic sources: key tokens that signal one class


@dataclass
class RawData:
    """Examples before tokenization.

    Attributes:
        labels: (N,) int64 ids in [0, num_labels): the class (classification) or, for causal data,
            the code of a grouping column (the ``operator`` of synthetic:arith, a file's
            ``data.label_column`` when it has one; else all zeros), so stratified splits work.
        label_names: (num_labels,) names; index i names label i.
        texts: N documents (classification text sources), else None.
        input_ids: (N, L) int64 token ids (synthetic:text-cls only; no padding), else None.
        prompts: N prompts (causal data; empty strings for plain language modelling), else None.
        responses: N responses the model learns to generate (causal data), else None.
        columns: other per-example columns, name -> (N,) numpy array of str (e.g. ``operator``).
        text_pairs: N second sentences of sentence pairs (``data.text_pair_column``), else None.
        targets: (N,) float32 regression targets (``task.type: regression``), else None; ``labels`` then
            holds score bins, so stratified splits and label-skew partitions still work.
        images: (N, C, H, W) float32 images, decoded, intensities in [0, 1] (image sources), else None;
            the image task resizes and normalises them for its model.
    """

    labels: np.ndarray
    label_names: list[str]
    texts: list[str] | None = None
    input_ids: np.ndarray | None = None
    prompts: list[str] | None = None
    responses: list[str] | None = None
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    text_pairs: list[str] | None = None
    targets: np.ndarray | None = None
    images: np.ndarray | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "RawData":
        """The examples at ``idx`` ((M,) ints), same label space and columns."""
        idx = np.asarray(idx, dtype=np.int64)

        def pick(values: list[str] | None) -> list[str] | None:
            return None if values is None else [values[i] for i in idx]

        return RawData(
            labels=self.labels[idx],
            label_names=list(self.label_names),
            texts=pick(self.texts),
            input_ids=None if self.input_ids is None else self.input_ids[idx],
            prompts=pick(self.prompts),
            responses=pick(self.responses),
            columns={name: values[idx] for name, values in self.columns.items()},
            text_pairs=pick(self.text_pairs),
            targets=None if self.targets is None else self.targets[idx],
            images=None if self.images is None else self.images[idx],
        )


def encode_labels(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to 0..K-1 in sorted order.

    Integer (or integral float, or bool) labels keep their numeric order; anything else is sorted
    as strings.

    Returns:
        ((N,) int64 class ids, K label names).
    """
    arr = np.asarray(values)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind in "biu":
        uniq, ids = np.unique(arr, return_inverse=True)
        return ids.astype(np.int64), [str(u.item()) for u in uniq]
    names = sorted({str(v) for v in values})
    lookup = {name: i for i, name in enumerate(names)}
    return np.asarray([lookup[str(v)] for v in values], dtype=np.int64), names
