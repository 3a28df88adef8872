"""Dtype rules and dtype-aware thresholds shared by the manifold code."""

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Return the dtype that geometry runs in for inputs of the given dtypes.

    This is the widest floating dtype among the inputs, but at least float32,
    because float16 and bfloat16 keep only 11 and 8 significant bits, too few
    for angles near 0 and π.

    Args:
        *dtypes: Dtypes of the input tensors. Non-floating dtypes are ignored.

    Returns:
        float32 or float64.
    """
    result = torch.float32
    for dtype in dtypes:
        if dtype.is_floating_point:
            result = torch.promote_types(result, dtype)
    return result


def result_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Return the dtype of a result: the promotion of the input dtypes.

    Args:
        *dtypes: Dtypes of the input tensors.

    Returns:
        The promoted dtype, which may be float16 or bfloat16.
    """
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def taylor_threshold(dtype: torch.dtype) -> float:
    """Return the angle below which sin(θ)/θ and θ/sin(θ) switch to their Taylor series.

    The three-term series leave out a θ⁶ term with coefficient below 1/400, so
    at θ = 2·eps^(1/6) the truncation error is under eps/6. Above the
    threshold the closed forms are used, whose autograd derivatives lose about
    eps/θ² to cancellation, which is about 2e-5 relative in float32.

    Args:
        dtype: Floating dtype the series is evaluated in.

    Returns:
        The threshold in radians.
    """
    return 2.0 * torch.finfo(dtype).eps ** (1.0 / 6.0)


def wide_dtype(device: torch.device) -> torch.dtype:
    """Return float64, or float32 on devices without float64 support (Apple MPS).

    Args:
        device: Device the computation runs on.

    Returns:
        The widest floating dtype available on ``device``.
    """
    if device.type == "mps":
        return torch.float32
    return torch.float64
