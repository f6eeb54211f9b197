"""Hugging Face ``datasets`` (the optional extra ``pip install lightning_kd[hf]``) as ``(image, target)`` items."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


class HFImageDataset(Dataset):
    """A ``datasets.Dataset`` with an image and a label column, read as ``(PIL image, int)`` items.

    Labels come from the label column without decoding any image (``targets``); class names from a ``ClassLabel``
    feature; ``fingerprint`` is the dataset's own (it changes with every transformation of the data).
    """

    def __init__(self, dataset, image_column: str = "image", label_column: str = "label") -> None:
        missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(f"the Hugging Face dataset has no column {missing} (columns: {dataset.column_names}); "
                             "pass image_column= / label_column=")
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        names = getattr(dataset.features[label_column], "names", None)
        self.classes = list(names) if names else None
        self.fingerprint = f"hf:{dataset._fingerprint}"

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.dataset[self.label_column], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        row = self.dataset[int(index)]
        return row[self.image_column], row[self.label_column]
