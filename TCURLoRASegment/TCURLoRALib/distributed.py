"""Training on several processes under torchrun, with PyTorch's DistributedDataParallel (DDP): gloo on CPUs, NCCL
on GPUs.

``torchrun --nproc_per_node N -m TCURLoRALib train|pretrain ...`` starts N copies of the command; torchrun gives
each its ``RANK`` (0 .. WORLD_SIZE-1 over all machines), ``WORLD_SIZE`` and ``LOCAL_RANK`` (its number on its
machine, which is also its GPU), and the rendezvous (``MASTER_ADDR``, ``MASTER_PORT``). :func:`torchrun_session`
reads them, joins the process group and hands :func:`~TCURLoRALib.loop.fit` a :class:`DataParallel` hook:

- Every process reads the same inputs and settings and builds the same model from the same seed (DDP also copies
  rank 0's parameters to the others once, at the start).
- A step's batch is N x ``--batch-size`` crops drawn from one seeded stream: the very crops that one process with
  ``--batch-size`` N x B draws. Rank r cuts and augments crops r B .. r B + B - 1; it only draws the others
  (:meth:`CropSampler.batch` ``keep``), so every random stream moves on as in that one process.
- The loss is not a mean over crops: its Dice term is a batch Dice (sums over every crop, then a ratio). So every
  process sums its crops' statistics (:func:`~TCURLoRALib.loss.dice_ce_statistics`: S_r), the sums are added over
  the processes (one all-reduce of 3 C + 2 numbers: S), and every process computes the loss of the whole batch
  L(S) (the value reported) and backpropagates through its own crops ``N <dL/dS, S_r>``. DDP averages the
  gradients over the N processes: ``sum_r dL/dS dS_r/dθ = dL/dθ``, the gradient of the one-process loss.
- Rank 0 alone validates, reports progress, checks the output before the work and writes it at the end; the others
  return nothing. The card's ``batch_size`` is the batch of a step over all processes, and ``training``
  gains ``distributed``: ``{"processes": N, "backend": ...}``.

So a run of N processes x B crops and a one-process run of N B crops with the same seed compute the same losses,
gradients, parameters and file up to the order of floating-point sums (partial sums per process, convolutions over
batches of B instead of N B); ``Testing/test_distributed.py`` measures how close.

Failures: a process that fails ends the job. torchrun stops the others (SIGTERM) and names the failed rank; a
process waiting for a lost one fails at once (gloo: connection closed by peer) or after
:data:`COLLECTIVE_TIMEOUT_S`. Rank 0 writes nothing unless every step succeeded. SIGINT and SIGTERM sent to
torchrun reach every process. The cancel file (``$TCURLORA_CANCEL_FILE``) is looked for by every process at every
step, and the answers travel with the step's all-reduce, so that all processes stop at the same step (it is not
looked for before the first step).

``$TCURLORA_DDP_TRACE`` (a folder), for tests and debugging: every process appends after each step a JSON line
``{"step", "rank", "pid", "digest"}`` (sha256 of its trainable parameters) to ``rank<R>.jsonl`` there.

Torch is imported only where it is used: the CLI reads :class:`World` without it.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .devices import check_device
from .outputs import OutputFiles
from .progress import CANCEL_FILE_ENV, Cancelled

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .crops import CropSampler
    from .loop import OneProcess

__all__ = ["COLLECTIVE_TIMEOUT_S", "TRACE_ENV", "DataParallel", "World", "device_for", "torchrun_session"]

COLLECTIVE_TIMEOUT_S = 1800
"""How long a process waits for the others in one collective (e.g. while rank 0 validates) before it fails."""
TRACE_ENV = "TCURLORA_DDP_TRACE"


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job.

    Args:
        rank: 0 .. size-1 over every machine (rank 0 reports and writes).
        size: number of processes (``WORLD_SIZE``).
        local_rank: number on this machine (``LOCAL_RANK``), the GPU it uses.
    """

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> World | None:
        """The job torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or None outside torchrun or where it
        started one process (which then trains exactly as without torchrun).

        Raises:
            ValueError: a variable that is not a number, or a rank outside the world.
        """
        if not environ.get("WORLD_SIZE"):
            return None
        values = {}
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            text = environ.get(name, "0")
            if not text.strip().isdigit():
                raise ValueError(f"${name} must be a number (torchrun sets it), got {text!r}")
            values[name] = int(text)
        world = cls(rank=values["RANK"], size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])
        if world.size < 1 or world.rank >= world.size:
            raise ValueError(f"$RANK {world.rank} is outside $WORLD_SIZE {world.size} (torchrun sets both)")
        return world if world.size > 1 else None


def device_for(world: World, name: str) -> torch.device:
    """A process's device for a ``--device`` value: the CPU, or GPU ``LOCAL_RANK`` (``auto``: where torch sees one).

    Raises:
        ValueError: ``cuda:N`` (each process takes the GPU of its local rank), or fewer GPUs than processes here.
    """
    import torch

    name = check_device(name)
    if name.startswith("cuda:"):
        raise ValueError(f"--device {name}: under torchrun each process uses the GPU numbered by its LOCAL_RANK; "
                         f"give --device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but CUDA is not available here (torch {torch.__version__});"
                         f" use --device cpu (gloo) or auto")
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"process LOCAL_RANK {world.local_rank} has no GPU: this machine has "
                         f"{torch.cuda.device_count()} (start at most that many with --nproc_per_node)")
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def torchrun_session(device: str, environ: Mapping[str, str] = os.environ) -> Iterator[OneProcess]:
    """The training's processes: :data:`~TCURLoRALib.loop.ONE_PROCESS` outside torchrun; under it, a
    :class:`DataParallel` in a process group (NCCL for a GPU, gloo for the CPU) that is left on success.

    Args:
        device: the ``--device`` value (see :func:`device_for`).
    """
    from .loop import ONE_PROCESS

    world = World.from_environment(environ)
    if world is None:
        yield ONE_PROCESS
        return
    import torch
    import torch.distributed as dist

    torch_device = device_for(world, device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    yield DataParallel(world, torch_device, backend, trace=environ.get(TRACE_ENV),
                       cancel_file=environ.get(CANCEL_FILE_ENV))
    # Only after success: after a failure a peer may be gone, and the process ends anyway.
    dist.destroy_process_group()


class _NoOutputs:
    """:class:`~TCURLoRALib.outputs.OutputFiles`' stand-in in a process that writes nothing: it checks nothing
    either (on a cluster the output folder may exist only on rank 0's machine)."""

    def add(self, path: Any, what: str, expected_bytes: int = 0) -> Path:
        return Path(path)

    def expect(self, path: Any, expected_bytes: int) -> None:
        """Nothing to check."""


class DataParallel:
    """:func:`~TCURLoRALib.loop.fit`'s hook for one process of a torchrun job (rules in the module docstring): the
    members of :class:`~TCURLoRALib.loop.OneProcess`, each for a process of several.

    Args:
        world: this process's place.
        device: its device (:func:`device_for`).
        backend: the process group's (``"gloo"`` or ``"nccl"``), already initialised.
        trace: a folder for the per-step parameter digests (``$TCURLORA_DDP_TRACE``), or None.
        cancel_file: the file whose appearance cancels the job (``$TCURLORA_CANCEL_FILE``), or None.
    """

    def __init__(self, world: World, device: torch.device, backend: str, trace: str | None = None,
                 cancel_file: str | None = None):
        self.world, self.torch_device, self.backend, self.cancel_file = world, device, backend, cancel_file
        self.processes, self.main = world.size, world.main
        self.trace = Path(trace) / f"rank{world.rank}.jsonl" if trace else None

    def device(self, name: str) -> torch.device:
        return device_for(self.world, name)

    def output_files(self, *, overwrite: bool, inputs: Sequence[Any] = ()) -> OutputFiles | _NoOutputs:
        return OutputFiles(overwrite=overwrite, inputs=inputs) if self.main else _NoOutputs()

    def wrap(self, model: nn.Module) -> nn.Module:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Buffers (the adapter's C and R) never change and are the same everywhere: not sent before every step.
        # Newer torch renamed the option (2.13 warns on the old name); older versions know only the old one.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        # Some parameters that train never reach the loss (MONAI's ViT blocks hold a LayerNorm for a cross-attention
        # that UNETR does not use). A static graph (the same at every step) lets DDP find them once, at the first
        # step, and leave their gradients None, so that the optimiser skips them as it does in one process.
        return DistributedDataParallel(model, device_ids=[self.torch_device] if self.torch_device.type == "cuda"
                                       else None, static_graph=True, **no_buffer_sync)

    def batch(self, sampler: CropSampler, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.world.rank * size
        return sampler.batch(size * self.processes, keep=range(start, start + size))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.distributed as dist

        from .loss import dice_ce_from_statistics, dice_ce_statistics

        own = dice_ce_statistics(logits, targets)
        # The step's one collective also carries whether any process found the cancel file, so that all stop
        # together here rather than one of them leaving the others waiting for it.
        asked = float(bool(self.cancel_file) and os.path.exists(self.cancel_file))
        total = torch.cat([own.detach(), own.new_tensor([asked])])
        dist.all_reduce(total)  # the same bits in every process, so every process computes the same loss
        if total[-1] > 0:
            raise Cancelled(f"cancel requested (found {self.cancel_file!r})")
        total = total[:-1].requires_grad_(True)
        value = dice_ce_from_statistics(total)
        (slope,) = torch.autograd.grad(value, total)
        share = (slope * own).sum() * self.processes  # DDP's mean over the processes divides by N again
        return share - share.detach() + value.detach()  # the value of the batch's loss, the gradient of the share

    def stepped(self, step: int, model: nn.Module) -> None:
        if self.trace is None:
            return
        import torch

        digest = hashlib.sha256()
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                digest.update(name.encode())
                digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        with open(self.trace, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"step": step, "rank": self.world.rank, "pid": os.getpid(),
                                     "digest": digest.hexdigest()}) + "\n")

    def record(self) -> dict[str, Any]:
        return {"distributed": {"processes": self.processes, "backend": self.backend}}
