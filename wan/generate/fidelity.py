"""How close a video is to a reference: PSNR, SSIM and mean absolute difference (scikit-image).

Both videos are frames [F, H, W, 3] of floats in [0, 1], as `wan.generate.run.generate` returns them (before
MP4 encoding, so the codec's losses are not counted).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def video_fidelity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """{"psnr": dB over the whole video, "ssim": mean over frames, "mad": mean |reference - other|}.

    data_range is 1.0 for both metrics. Identical videos give psnr = inf (no cap; written as null in
    JSON), ssim = 1.0 and mad = 0.0. SSIM uses scikit-image's 7x7 window, shrunk to the largest odd
    size that fits frames smaller than 7 pixels.
    """
    reference = np.asarray(reference, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if reference.shape != other.shape or reference.ndim != 4 or reference.shape[-1] != 3:
        raise ValueError(f"video_fidelity: need two videos [F, H, W, 3] of one shape, got {reference.shape} and {other.shape}")
    diff = np.abs(reference - other)
    mad = float(diff.mean())
    # skimage divides by the MSE; for identical videos return inf without its divide-by-zero warning
    psnr = float("inf") if mad == 0.0 else float(peak_signal_noise_ratio(reference, other, data_range=1.0))
    side = min(reference.shape[1:3])
    win_size = min(7, side if side % 2 else side - 1)
    ssim = float(np.mean([
        structural_similarity(r, o, channel_axis=-1, data_range=1.0, win_size=win_size)
        for r, o in zip(reference, other)
    ]))
    return {"psnr": psnr, "ssim": ssim, "mad": mad}
