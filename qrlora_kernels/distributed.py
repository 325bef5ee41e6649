"""Sharing the factorisations of ``apply_qrlora`` across the ranks of a process group.

Training itself uses PyTorch's own engines: a QR-LoRA model is a plain ``nn.Module`` whose
only trainable tensors are the ``lam`` vectors (and ``modules_to_save``), so it goes through
``DistributedDataParallel`` and FSDP2's ``fully_shard`` unchanged (see tests/test_distributed.py).

What this module adds is the set-up: each rank factorises only the modules it owns (a greedy
longest-job-first split by flop count), then every basis is broadcast from its owner. Each
basis is therefore computed exactly once, by one rank, with the same code as in a single
process, and every rank ends with bit-identical bases. With ``method="geqp3"`` on the CPU they are also
bit-identical to a single process's, at any thread count in either: neither which weights share
a batch nor the number of threads changes a CPU factorisation or its Q (see ``qrcp``). With ``budget``, only the small
energy diagonals travel first; the global selection runs identically on every rank; then
only the truncated bases are broadcast.

Tensors are broadcast on the weights' device, so the backend must support it (gloo: CPU,
nccl: CUDA). Call ``apply_qrlora`` on the full (unsharded) model, before wrapping it in DDP
or ``fully_shard``; every rank must call it with the same model and config (it is collective).

    torchrun --nproc_per_node 8 train.py     # in train.py:
        dist.init_process_group("nccl"); model.cuda()
        apply_qrlora(model, config)           # each rank factorises 1/8 of the modules
        for block in model.model.layers: fully_shard(block)
        fully_shard(model)
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional, Sequence

import torch

from .basis import QRLoraBasis, truncate

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def world_info(group=None) -> tuple[int, int]:
    """(this process's rank in ``group``, group size); (0, 1) outside torch.distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group passed "
                         f"as group=; call it on the group's members only (or with group=None: the whole world)")
    return rank, dist.get_world_size(group)


def _collective_device(group, hint: Optional[torch.device]) -> torch.device:
    """A device the group's backend takes tensors on: the CPU for gloo (also in "cpu:gloo,cuda:nccl") and MPI;
    else the weights' device ``hint`` (as the broadcasts of the bases use), or the current CUDA device for nccl."""
    import torch.distributed as dist
    backend = str(dist.get_backend(group))
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if hint is not None and hint.type not in ("cpu", "meta"):
        return hint
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _gather(values: torch.Tensor, group, device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """all_gather of a small tensor (the same shape on every rank), on a device the group's backend takes."""
    import torch.distributed as dist
    values = values.to(_collective_device(group, device))
    out = [torch.empty_like(values) for _ in range(world_info(group)[1])]
    dist.all_gather(out, values, group=group)
    return [t.cpu() for t in out]


def raise_together(error: Optional[BaseException], group=None, what: str = "apply_qrlora",
                   device: Optional[torch.device] = None) -> None:
    """Collective (every rank calls it): whether any rank failed. A rank with ``error`` raises it; the others raise
    a RuntimeError naming the failed ranks, instead of waiting for them in the next collective until the process
    group's timeout. Outside a process group, raises ``error`` if there is one. ``device``: the weights' device."""
    rank, world = world_info(group)
    if world > 1:
        flag = torch.tensor([error is not None], dtype=torch.int64)
        failed = [r for r, theirs in enumerate(_gather(flag, group, device)) if int(theirs[0])]
    if error is not None:
        raise error
    if world > 1 and failed:
        raise RuntimeError(f"{what} failed on rank(s) {', '.join(map(str, failed))} of the process group (see the "
                           f"error there); this rank ({rank}) stops too")


def check_same_on_every_rank(items: dict[str, bytes], group=None, what: str = "apply_qrlora",
                             device: Optional[torch.device] = None) -> None:
    """Collective: every rank passes the same labelled items (digests of its config and of each targeted weight);
    a difference (ranks that loaded other weights, or got another config) is a ValueError on every rank, naming
    the first differing item, instead of bases mixed from different models or a collective that never returns."""
    rank, world = world_info(group)
    if world == 1:
        return
    counts = [int(c[0]) for c in _gather(torch.tensor([len(items)], dtype=torch.int64), group, device)]
    if len(set(counts)) > 1:
        raise ValueError(f"{what}: the ranks of the process group have different numbers of targeted modules "
                         f"({', '.join(f'rank {r}: {c}' for r, c in enumerate(counts))}); every rank must pass the "
                         f"same model and config")
    labels = list(items)
    mine = torch.tensor([list(hashlib.blake2b(items[k], digest_size=16).digest()) for k in labels],
                        dtype=torch.uint8).reshape(len(labels), 16)
    for other, theirs in enumerate(_gather(mine, group, device)):
        differ = (theirs != mine).any(dim=1).nonzero()
        if differ.numel():
            raise ValueError(f"{what}: rank {other} and rank {rank} of the process group differ in "
                             f"{labels[int(differ[0])]}; every rank must pass the same model (weights) and config")


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Longest job first onto the least-loaded rank: a deterministic, balanced split."""
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        k = min(range(world_size), key=lambda k: (load[k], k))
        owners[j] = k
        load[k] += costs[j]
    return owners


def module_progress(total: int, enabled: Optional[bool], desc: str, group=None):
    """A tqdm bar over ``total`` modules, drawn by one process only (rank 0 of ``group`` under torch.distributed).

    ``enabled`` None: shown where tqdm would show it (a terminal or a notebook) unless ``TQDM_DISABLE`` is set
    (tqdm honours that only for arguments its caller leaves out, and ``disable`` is passed here).
    """
    from tqdm.auto import tqdm
    if world_info(group)[0] != 0:
        disable = True
    elif enabled is None:
        disable = True if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false") else None
    else:
        disable = not enabled
    return tqdm(total=total, desc=desc, unit="module", disable=disable, leave=False)


def _keep_r(basis, with_r: bool):
    return basis if with_r else basis._replace(R=None)


def compute_bases(weights: Sequence[torch.Tensor], factorise_many: Callable, *, names: Sequence[str],
                  progress: Optional[bool] = None, group=None,
                  ranks_fn: Optional[Callable[[list[torch.Tensor]], list[int]]] = None, with_r: bool = True) -> list:
    """Factorise every weight once (split across ranks when in a process group).

    ``factorise_many(weights, names, on_done)`` returns their ``QRLoraBasis`` list (with ``ranks_fn``:
    diag-rule bases or ``DeferredBasis`` objects, which ``truncate`` turns into bases) and calls ``on_done(count)`` as weights finish.
    ``ranks_fn(diag_energies)`` optionally sets every module's final rank from all modules' energies
    (the global budget); a module given rank 0 comes back as None. Returns the bases in input order;
    every rank gets identical tensors. ``with_r=False`` (layers that keep Q only): ranks other than a basis's
    owner receive no R (it is not broadcast), and their bases hold None there.
    """
    rank, world = world_info(group)
    if world == 1:
        with module_progress(len(weights), progress, "QR-LoRA factorisation") as bar:
            bases = factorise_many(list(weights), list(names), bar.update)
        if ranks_fn is not None:
            final = ranks_fn([b.diag_energy[:b.rank] for b in bases])
            bases = [_keep_r(truncate(b, r), with_r) if r > 0 else None for b, r in zip(bases, final)]
        return bases

    import torch.distributed as dist

    def src(owner: int) -> int:
        return owner if group is None else dist.get_global_rank(group, owner)

    costs = [float(w.shape[0]) * w.shape[1] * min(w.shape) for w in weights]
    owners = assign_owners(costs, world)
    mine = [j for j in range(len(weights)) if owners[j] == rank]
    error = None
    try:
        with module_progress(len(mine), progress, f"QR-LoRA factorisation (rank {rank}/{world})", group) as bar:
            local = dict(zip(mine, factorise_many([weights[j] for j in mine], [names[j] for j in mine], bar.update)))
    except Exception as err:  # noqa: BLE001 -- a non-finite weight, out of memory: every rank must hear of it
        error = err
    raise_together(error, group, device=weights[0].device if weights else None)

    # Phase 1: the small per-module facts (rank, energy, diagonal) every rank needs.
    metas, diags = [], []
    for j, w in enumerate(weights):
        meta = torch.zeros(4, dtype=torch.float64, device=w.device)
        if owners[j] == rank:
            b = local[j]
            meta[0], meta[1], meta[2] = b.rank, b.diag_energy.numel(), b.energy_captured
            meta[3] = _DTYPES.index(b.dtype)
        dist.broadcast(meta, src=src(owners[j]), group=group)
        diag = (local[j].diag_energy.to(device=w.device, dtype=torch.float64).contiguous() if owners[j] == rank
                else torch.empty(int(meta[1]), dtype=torch.float64, device=w.device))
        dist.broadcast(diag, src=src(owners[j]), group=group)
        metas.append(meta.tolist())
        diags.append(diag)
    final = (ranks_fn([d[:int(m[0])] for d, m in zip(diags, metas)]) if ranks_fn is not None
             else [int(m[0]) for m in metas])

    # Phase 2: the (truncated) bases themselves.
    out = []
    for j, w in enumerate(weights):
        r = final[j]
        if r == 0:  # no component within the budget; ``final`` is identical on every rank, so all skip it
            out.append(None)
            continue
        m, n = w.shape
        dtype = _DTYPES[int(metas[j][3])]
        if owners[j] == rank:
            b = local.pop(j)
            b = truncate(b, r) if ranks_fn is not None else b
            Q, R, perm = b.Q.contiguous(), b.R.contiguous() if with_r else None, b.perm.to(torch.int64).contiguous()
        else:
            Q = torch.empty(m, r, dtype=dtype, device=w.device)
            R = torch.empty(r, n, dtype=dtype, device=w.device) if with_r else None
            perm = torch.empty(n, dtype=torch.int64, device=w.device)
        for t in (Q, R, perm):
            if t is not None and t.numel():
                dist.broadcast(t, src=src(owners[j]), group=group)
        captured = float(diags[j][:r].sum()) if ranks_fn is not None else float(metas[j][2])
        out.append(QRLoraBasis(Q, R, perm, r, captured, diags[j].to("cpu")))
    return out
