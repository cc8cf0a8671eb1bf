"""Data-parallel fine-tuning over processes started by torchrun (one per GPU, or a few on a CPU).

Every process holds the whole model and the same batch order; an optimizer step takes
grad_accum x world_size batches and process r trains on batches r, r + world_size, ... of them.
Each process collates only its own batches, so it knows only their loss terms (train.loss_items):
it weighs each batch's loss by its terms over a guess of the group's count that every process makes
alike (examples in the group x terms per example in a sample of the data, rank 0's), the step's record sums the
true count, and the summed gradients are scaled by guess / count. So each batch weighs its share of
the whole group's terms, and N processes with batch b update as one process with batch b and
grad_accum N (to rounding).

Why not DistributedDataParallel: it all-reduces inside each backward, so every process must run
the same number of backwards. The last step of an epoch (5 batches over 2 processes) or a batch
without a labelled token leaves a process with fewer, and DDP would wait for it forever; so would
the others when one process stops on a NaN loss. Here each step first sums a small record (the
step's losses, its token count, which parameters have gradients), so every process sees a bad loss
and stops together, and then keeps or drops the gradients summed while its last backward ran.

The gradient sums overlap the backward as DDP's do (GradientSum): during each process's last backward
of a step, a bucket of gradients is all-reduced as soon as its parameters have theirs, in one bucket
order on every process, so the collectives pair up whatever each process computed. A process without
a backward that step sends zeros. Buckets wait only for the parameters that had a gradient in the
process's previous step (a tagging model never uses the pooler): one that gets a gradient after its
bucket left sends the whole step back to the plain sum after the backward, on every process.
"""
from __future__ import annotations

import datetime
import os
from typing import Sequence

import torch

# Gradients are summed in flat buckets of at most this many bytes: few collectives, and a bucket leaves
# while the backward still runs. The sums are held until the step's record is in: one more copy of the
# gradients at the end of a backward (BERT-base fp32: 440 MB), as DDP's default buckets.
BUCKET_BYTES = 64 * 2**20
# How long a process waits in a collective before the job fails (transformers' ddp_timeout default).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def _dist():
    return torch.distributed


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the default process group; (0, 1) without one."""
    if _dist().is_available() and _dist().is_initialized():
        return _dist().get_rank(), _dist().get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.run) sets WORLD_SIZE for each process it starts."""
    value = os.environ.get("WORLD_SIZE", "").strip() or "1"
    if not value.isdigit():
        raise ValueError(f"WORLD_SIZE must be a number of processes, got {value!r}")
    return int(value) > 1


def init_from_env(device_name: str | None) -> torch.device:
    """Join the process group torchrun describes in the environment and return this process's device:
    cuda:LOCAL_RANK on a machine with GPUs (NCCL), the CPU otherwise or with --device cpu (gloo)."""
    if not _dist().is_available():
        raise RuntimeError("WORLD_SIZE > 1 asks for several processes, but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the "
                         "processes with torchrun (e.g. torchrun --nproc-per-node 2 -m fastbert finetune ...)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda, got {device_name!r}") from None
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device_name}: under torchrun each process takes cuda:LOCAL_RANK; give "
                             "--device cuda (or leave it out), and choose GPUs with CUDA_VISIBLE_DEVICES")
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this torch build or machine has no usable CUDA device; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most that many processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device must be cpu or cuda, got {device_name!r}")
    if not _dist().is_initialized():
        # The others wait in a collective while rank 0 alone writes a checkpoint (BERT-large with AdamW's
        # moments: 4 GB) or evaluates with a library user's evaluate: NCCL's 10 minutes may not be enough.
        _dist().init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return device


def check_device(device: torch.device) -> None:
    """NCCL moves only CUDA tensors: a CPU model in an NCCL group would fail at its first all-reduce."""
    backend = _dist().get_backend()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses NCCL, which needs the model on a GPU; the model is on {device} "
                         "(use a gloo group for CPU training)")


def check_same_run(identity: dict, device: torch.device,
                   advice: str = "give every process the same data and settings; each takes its share of every step") -> None:
    """Every process must train the same data with the same settings (the batch order, the loss
    weights and the step count follow from them): a process handed its own shard of the data, or
    another seed, would still sum gradients, of other batches, without a word. Raised on every
    process, so none is left waiting in a collective."""
    first = from_first(identity)
    differs = [f"{k}={first[k]!r} on rank 0, {identity.get(k)!r} here" for k in first if identity.get(k) != first[k]]
    flag = torch.tensor([float(bool(differs))], device=device)
    _dist().all_reduce(flag)
    if flag.item():
        rank, world = rank_and_world()
        raise ValueError(f"the {world} processes do not train the same run ({int(flag.item())} differ from rank 0"
                         + (f"; rank {rank}: {'; '.join(differs)}" if differs else "")
                         + f"): {advice}")


def broadcast_model(model: torch.nn.Module) -> None:
    """Start every process from rank 0's weights (a head initialised from another seed would drift apart)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            _dist().broadcast(tensor.data, src=0)


def sum_step_record(record: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) the step's small float64 record; returns it on the host."""
    _dist().all_reduce(record)
    return record.cpu()


def sum_gradients(params: Sequence[torch.nn.Parameter], used: Sequence[bool], scale: float = 1.0) -> None:
    """Sum the gradients of the parameters some process has one for (`used`, the same list on every
    process), times `scale`; a process that ran no backward for one takes zeros there. A parameter
    no process used keeps grad None, as in one process: AdamW then leaves it alone, where a zero
    gradient would still decay it."""
    grads = []
    for param, wanted in zip(params, used):
        if not wanted:
            param.grad = None
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        buckets, size = [[]], 0
        for grad in same:
            nbytes = grad.numel() * grad.element_size()
            if buckets[-1] and size + nbytes > BUCKET_BYTES:
                buckets, size = buckets + [[]], 0
            buckets[-1].append(grad)
            size += nbytes
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            _dist().all_reduce(flat)
            if scale != 1.0:
                flat.mul_(scale)
            for g, piece in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(piece.view_as(g))


class GradientSum:
    """Sums `params`' gradients over the processes, bucket by bucket while the last backward of a step
    runs (arm, then the backward, then finish and apply): fastbert/distributed.py's docstring. The
    summed buckets are held aside until apply, so the gradients stay this process's own until every
    process has said whether the overlap held (a late gradient: the plain sum_gradients instead)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_bytes: int | None = None):
        self.params = list(params)
        bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        trained = [i for i, p in enumerate(self.params) if p.requires_grad]
        # Backward reaches the parameters about in reverse order of registration (the head's first,
        # the embeddings' last): buckets in that order fill, and leave, while the backward runs.
        # A bucket holds one dtype (one flat tensor) and consecutive parameters: a bucket kept open for
        # its dtype across the model would wait for the backward's end.
        self.buckets: list[list[int]] = []
        size, dtype = 0, None
        for i in reversed(trained):
            param = self.params[i]
            nbytes = param.numel() * param.element_size()
            if not self.buckets or param.dtype != dtype or size + nbytes > bucket_bytes:
                self.buckets.append([])
                size, dtype = 0, param.dtype
            self.buckets[-1].append(i)
            size += nbytes
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self.trained = trained
        self.expected = set(trained)   # parameters a bucket waits for: those with a gradient last time
        self.armed, self.sent, self._handles = False, [], []
        self.sent_early = self.fallbacks = 0   # buckets sent during a backward; steps summed the plain way

    def attach(self) -> None:
        """Hook the parameters (Trainer.train: for its length only, so a Trainer left behind, maybe
        armed by an interrupted backward, sends nothing during another's). The buckets were laid out,
        alike on every process, from which parameters were trained when this was built."""
        now = [i for i, p in enumerate(self.params) if p.requires_grad]
        if now != self.trained:
            raise ValueError("the parameters' requires_grad changed after the Trainer was built (it sums "
                             "the gradients of those trained then): build the Trainer after freezing or "
                             "unfreezing parameters")
        self.remove()
        self.disarm()
        self._handles = [self.params[i].register_post_accumulate_grad_hook(self._hook(i)) for i in self.trained]

    def _hook(self, index: int):
        def ready(_param):
            if self.armed:
                self._ready(index)
        return ready

    def arm(self) -> None:
        """The next backward is this process's last of the step: send buckets as they fill."""
        self.waiting = [sum(i in self.expected for i in bucket) for bucket in self.buckets]
        self.fired: set[int] = set()
        self.next_bucket, self.sent, self.late = 0, [], False
        self.armed = True
        self._send_ready()

    def _ready(self, index: int) -> None:
        self.fired.add(index)
        bucket = self.bucket_of[index]
        if bucket < self.next_bucket:
            self.late = True           # its bucket left without it: apply() falls back
        elif index in self.expected:
            self.waiting[bucket] -= 1
            self._send_ready()

    def _send_ready(self) -> None:
        # in bucket order on every process, however their backwards ran: the collectives pair up
        while self.next_bucket < len(self.buckets) and self.waiting[self.next_bucket] == 0:
            self._send(self.next_bucket)

    def _send(self, b: int) -> None:
        with torch.no_grad():
            flat = torch.cat([(self.params[i].grad if self.params[i].grad is not None
                               else torch.zeros_like(self.params[i])).reshape(-1) for i in self.buckets[b]])
        self.sent.append((flat, _dist().all_reduce(flat, async_op=True)))
        self.next_bucket += 1
        self.sent_early += self.armed

    def finish(self) -> bool:
        """After the last backward (or instead of it, on a process that ran none): send what is left,
        wait for every sum; returns whether a gradient came after its bucket left."""
        if not self.armed:
            self.arm()
        self.armed = False
        while self.next_bucket < len(self.buckets):
            self._send(self.next_bucket)
        for _, work in self.sent:
            work.wait()
        if self.fired:
            self.expected = self.fired
        return self.late

    def apply(self, used: Sequence[bool], scale: float, any_late: bool) -> None:
        """Give each parameter its summed gradient times `scale`; `used` (one flag per parameter of
        `params`, the same on every process) says which some process has one for: the others keep
        None. any_late (some process's finish() said so): the plain sum over the backward's gradients."""
        sent, self.sent = self.sent, []
        if any_late:
            self.fallbacks += 1
            sum_gradients(self.params, used, scale)
            return
        for param, wanted in zip(self.params, used):
            if not wanted:
                param.grad = None
        with torch.no_grad():
            for (flat, _), bucket in zip(sent, self.buckets):
                if scale != 1.0:
                    flat.mul_(scale)
                for i, piece in zip(bucket, flat.split([self.params[i].numel() for i in bucket])):
                    param = self.params[i]
                    if not used[i]:
                        continue
                    if param.grad is None:
                        param.grad = piece.view_as(param).clone()
                    else:
                        param.grad.copy_(piece.view_as(param))

    def disarm(self) -> None:
        """Forget a step left midway (an exception in its backward): its sums are not the next step's."""
        self.armed, self.sent = False, []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def gather_to_first(obj) -> list | None:
    """Every process's `obj`, in rank order, on rank 0 (None elsewhere)."""
    rank, world = rank_and_world()
    out = [None] * world if rank == 0 else None
    _dist().gather_object(obj, out, dst=0)
    return out


def gather_to_all(obj) -> list:
    """Every process's `obj`, in rank order, on every process."""
    out = [None] * rank_and_world()[1]
    _dist().all_gather_object(out, obj)
    return out


def from_first(obj):
    """Rank 0's `obj` on every process."""
    holder = [obj]
    _dist().broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    _dist().barrier()
