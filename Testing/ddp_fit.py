"""A few :func:`fit` steps of the tiny UNETR in float64, in one process or as one of a torchrun job (test helper).

``python -m torch.distributed.run --nproc_per_node N Testing/ddp_fit.py OUT BATCH OPTIMIZER [STEPS]`` trains with
``BATCH`` crops a process; ``python Testing/ddp_fit.py OUT BATCH OPTIMIZER [STEPS]`` (or :func:`run`) in one
process. The process that
writes (rank 0) saves the trained parameters to ``OUT`` (safetensors). In float64 the float rounding of the sums is
far below what a wrong crop, a wrong loss reduction or a wrong gradient scale changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "TCURLoRASegment"))

from synthetic import BASE_LABELS, case_arrays, tiny_unetr  # noqa: E402
from TCURLoRALib.cases import PreparedCase  # noqa: E402
from TCURLoRALib.distributed import torchrun_session  # noqa: E402
from TCURLoRALib.loop import fit, reproducible  # noqa: E402
from TCURLoRALib.settings import TrainSettings  # noqa: E402

STEPS = 3
PATCH = (32, 32, 32)


class Float64(nn.Module):
    """The network in float64, fed the sampler's float32 crops."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images.double())


def cases() -> list[PreparedCase]:
    """Three synthetic cases with the base's labels (target structure as white matter); the first has its top half
    unannotated, so that some crops hold fewer annotated voxels than others."""
    prepared = []
    for seed in range(3):
        image, labels = case_arrays(seed)
        target = np.where(labels == 5, 2, labels).astype(np.int64)
        if seed == 0:
            target[: target.shape[0] // 2] = -1
        prepared.append(PreparedCase(f"case{seed}", image, target))
    return prepared


def run(out: Path, batch_size: int, optimizer_name: str, steps: int = STEPS) -> None:
    """Train ``steps`` steps (seed 0, ``batch_size`` crops a process) and write the parameters from rank 0."""
    settings = TrainSettings(steps=steps, batch_size=batch_size, validation="none", lr=1e-2, seed=0, device="cpu",
                             threads=1)
    with torchrun_session(settings.device) as parallel, reproducible(settings.seed, settings.threads):
        model = Float64(tiny_unetr(seed=0))
        model.train()
        optimizers = {"sgd": lambda: torch.optim.SGD(model.parameters(), lr=settings.lr, weight_decay=1e-2),
                      "adamw": lambda: torch.optim.AdamW(model.parameters(), lr=settings.lr)}
        fit(model, optimizers[optimizer_name](), cases(), [], labels=BASE_LABELS, patch_size=PATCH,
            settings=settings, parallel=parallel)
        if parallel.main:
            save_file({name: value.detach().contiguous() for name, value in model.state_dict().items()}, str(out))


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:5]))
