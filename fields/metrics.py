"""Image quality metrics on arrays in [0, 1]."""

from __future__ import annotations

import numpy as np


def mse_to_psnr(mse: float) -> float:
    """PSNR in dB for images in [0, 1] from their mean squared error (floored at 1e-20: at most 200 dB)."""
    return float(-10.0 * np.log10(max(float(mse), 1e-20)))


def batch_psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of ``images`` against ``reference``, both ``[N, ...]`` in [0, 1] -> ``[N]`` float64."""
    errors = np.mean(np.square(np.asarray(images, np.float64) - np.asarray(reference, np.float64)),
                     axis=tuple(range(1, np.ndim(reference))))
    return -10.0 * np.log10(np.maximum(errors, 1e-20))


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of ``image`` against ``reference``, both ``[H, W, C]`` in [0, 1]."""
    difference = np.asarray(image, np.float64) - np.asarray(reference, np.float64)
    return mse_to_psnr(float(np.mean(difference**2)))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window sigma 1.5, K1=0.01, K2=0.03.

    Args:
        image, reference: ``[H, W, C]`` (or ``[H, W]``) floats in [0, 1]; channels are averaged.
    """
    from skimage.metrics import structural_similarity

    image = np.asarray(image, np.float64)
    reference = np.asarray(reference, np.float64)
    if image.shape != reference.shape:
        raise ValueError(f"ssim: shapes differ, {image.shape} vs {reference.shape}")
    if image.ndim == 2:
        image, reference = image[..., None], reference[..., None]
    return float(
        structural_similarity(
            image,
            reference,
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )
