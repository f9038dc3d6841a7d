"""The torch / CUDA / GPU facts of this process: what every job's manifest records and the report shows
(kept apart from the report's HTML modules, so the stages that record them do not depend on those)."""

from __future__ import annotations


def torch_info() -> dict:
    """torch / CUDA / GPU facts and the determinism flags of this process."""
    try:
        import torch
    except ImportError:
        return {"torch": "not installed", "determinism": "unknown (no torch)"}
    cuda = torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "cuda (build)": torch.version.cuda or "none",
        "cuda available": cuda,
        "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    info["determinism"] = (
        f"GPU: torch.backends.cudnn.deterministic={info['cudnn.deterministic']}, "
        f"torch.use_deterministic_algorithms={info['use_deterministic_algorithms']}; GPU kernels may still "
        "differ across GPU models and library versions."
        if cuda
        else "CPU only: deterministic (fixed seeds; greedy or seeded decoding; CPU kernels with reproducible reductions)."
    )
    return info
