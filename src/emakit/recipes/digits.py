"""The diffusion recipe's data: scikit-learn's bundled 8x8 digits, scaled to [-1, 1] (no download)."""

from __future__ import annotations

import torch


def load_digits_tensor() -> torch.Tensor:
    """The 1797 8x8 digits bundled with scikit-learn, as (N, 64) floats in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the diffusion recipe needs scikit-learn: pip install 'emakit[demo]'") from None
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    return x * 2 - 1, torch.tensor(digits.target)
