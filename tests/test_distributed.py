"""QR-LoRA under torch.distributed, launched with torchrun: 2 CPU processes, gloo backend.

The test runs this very file under ``torchrun --nproc_per_node 2``; each rank checks that

1. ``apply_qrlora`` inside the process group splits the factorisations (each rank computes
   only its share) and ends with bases bit-identical to a single process's, with and
   without a global ``budget``;
2. DistributedDataParallel trains the converted model: lam gradients equal the
   single-process gradient of the whole batch, frozen tensors stay untouched;
3. FSDP2 (``torch.distributed.fsdp.fully_shard``) does the same with sharded lam, and its
   ``torch.distributed.checkpoint`` state dicts (sharded and full) restore the model.

After training, each wrapped model saves its adapter (every rank calls ``save_adapter``, rank 0
writes; FSDP2 gathers the shards) and a plain base model loaded with it reproduces the outputs.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

HIDDEN = 24


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.up = nn.Linear(HIDDEN, 40)
        self.down = nn.Linear(40, HIDDEN)

    def forward(self, h):
        h = h + torch.tanh(self.query(h)) * self.value(h)
        return h + self.down(torch.relu(self.up(h)))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return h


def _base_model():
    torch.manual_seed(1234)  # every rank builds the same base model
    return TinyModel()


def _bases(model):
    from qrlora_kernels.model import qrlora_layers
    return {name: (layer.Q, layer.R, layer.perm, layer.rank) for name, layer in qrlora_layers(model)}


def _lam_grads_single_process(config, x, target):
    from qrlora_kernels import apply_qrlora
    model = _base_model()
    apply_qrlora(model, config, progress=False, group=_single_group())
    _set_lam(model)
    (model(x) - target).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


_SINGLE = {}


def _single_group():
    return _SINGLE["group"]


def _set_lam(model):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lam"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _check_apply(rank, world):
    import qrlora_kernels.model as qm
    from qrlora_kernels import QRLoraConfig, apply_qrlora
    calls = []
    original = qm._factorise_many

    def counting(weights, config, names, on_done=None):
        calls.extend(tuple(w.shape) for w in weights)
        return original(weights, config, names, on_done)
    qm._factorise_many = counting
    try:
        for config in (QRLoraConfig(target_modules="all-linear", tau=0.8),
                       QRLoraConfig(target_modules="all-linear", budget=97),
                       QRLoraConfig(target_modules="all-linear", tau=0.8, store_r=False)):
            calls.clear()
            shared = _base_model()
            report = apply_qrlora(shared, config, progress=False)
            mine = len(calls)
            alone = _base_model()
            single_report = apply_qrlora(alone, config, progress=False, group=_single_group())
            assert 0 < mine < len(single_report.modules) + len(single_report.skipped), \
                f"rank {rank} factorised {mine} modules: the work was not split"
            assert [(m.name, m.rank) for m in report.modules] == [(m.name, m.rank) for m in single_report.modules]
            assert report.adapter_params == single_report.adapter_params
            got, expected = _bases(shared), _bases(alone)
            assert got.keys() == expected.keys()
            for name in got:
                if not config.store_r:  # Q only: no R is broadcast or kept
                    assert got[name][1] is None and expected[name][1] is None, name
                for a, b in zip(got[name][:3], expected[name][:3]):
                    assert (a is None and b is None) or torch.equal(a, b), \
                        f"rank {rank}: {name} basis differs from a single process's"
            if config.budget is not None:
                assert report.adapter_params == 97
    finally:
        qm._factorise_many = original


def _expect_error(call, kind, pattern):
    import re
    try:
        call()
    except kind as err:
        assert re.search(pattern, str(err)), f"{type(err).__name__}: {err}"
        return
    raise AssertionError(f"no {kind.__name__} matching {pattern!r}")


def _check_ranks_fail_and_disagree_together(rank, world):
    """Ranks that disagree (other weights, another config) all raise, naming the difference, instead of mixing
    bases from different models or dying in a mismatched collective; a rank that fails alone (a weight on the meta
    device, a factorisation error) makes every rank raise instead of leaving them in a collective until the
    process group's timeout; a rank outside the group passed is told so."""
    from qrlora_kernels import QRLoraConfig, apply_qrlora
    config = QRLoraConfig(target_modules="all-linear", tau=0.8)
    model = _base_model()
    if rank == 1:
        with torch.no_grad():
            model.layers[1].up.weight.mul_(1.5)
    _expect_error(lambda: apply_qrlora(model, config, progress=False), ValueError,
                  r"rank \d and rank \d of the process group differ in targeted module 6 \(layers\.1\.up: its name, "
                  r"or its weight's")
    other = QRLoraConfig(target_modules="all-linear", tau=0.8 if rank == 0 else 0.9)
    _expect_error(lambda: apply_qrlora(_base_model(), other, progress=False), ValueError, r"differ in the config")
    # The same modules listed in another order (a list made from a set differs between processes) are the same
    # config; the same weights under other names are not the same model.
    names = ["query", "value", "up"]
    apply_qrlora(_base_model(), QRLoraConfig(target_modules=names if rank == 0 else names[::-1]), progress=False)
    renamed = _base_model()
    if rank == 1:
        renamed.layers[0].add_module("key", renamed.layers[0].query)
        del renamed.layers[0].query
    _expect_error(lambda: apply_qrlora(renamed, QRLoraConfig(target_modules=["query", "key", "value"]),
                                       progress=False),
                  ValueError, r"differ in targeted module 0 \(layers\.0\.\w+: its name")
    model = _base_model()
    if rank == 1:
        model.layers[2].query.to("meta")
    if rank == 1:
        _expect_error(lambda: apply_qrlora(model, config, progress=False), ValueError, r"on the meta device")
    else:
        _expect_error(lambda: apply_qrlora(model, config, progress=False), RuntimeError,
                      r"apply_qrlora failed on rank\(s\) 1 of the process group")
    model = _base_model()
    with torch.no_grad():
        model.layers[0].down.weight[3, 5] = float("nan")  # on every rank: only its owner's factorisation fails
    try:
        apply_qrlora(model, config, progress=False)
        raise AssertionError("a NaN weight was factorised")
    except ValueError as err:
        assert "contains NaN or Inf" in str(err), err
    except RuntimeError as err:
        assert "failed on rank(s)" in str(err), err
    outside = 1 - rank  # the group holding only the other rank
    _expect_error(lambda: apply_qrlora(_base_model(), config, progress=False, group=_SINGLE["groups"][outside]),
                  ValueError, rf"global rank {rank}\) is not a member of the process group")


def _converted_with_reference_grads(seed):
    """A converted model with random lam, a batch (x, target) from ``seed``, and the lam gradients one process
    computes on the whole batch: what each data-parallel wrapper must reproduce from its half."""
    from qrlora_kernels import QRLoraConfig, apply_qrlora
    config = QRLoraConfig(target_modules=["query", "value", "up"])
    gen = torch.Generator().manual_seed(seed)
    x, target = torch.randn(4, 5, HIDDEN, generator=gen), torch.randn(4, 5, HIDDEN, generator=gen)
    expected = _lam_grads_single_process(config, x, target)
    model = _base_model()
    apply_qrlora(model, config, progress=False)
    _set_lam(model)
    return model, x, target, expected


def _check_ddp(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    model, x, target, expected = _converted_with_reference_grads(seed=99)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".lam")}
    ddp = DistributedDataParallel(model)
    share = slice(2 * rank, 2 * rank + 2)  # each rank its half of the batch
    (ddp(x[share]) - target[share]).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=f"DDP grad of {name}")
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for k, v in model.state_dict().items():
        if not k.endswith(".lam"):
            assert torch.equal(v, frozen[k]), f"DDP changed frozen {k}"
    lam = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    gathered = [torch.empty_like(lam) for _ in range(world)]
    dist.all_gather(gathered, lam)
    assert torch.equal(gathered[0], gathered[1]), "DDP ranks diverged"
    _check_saved_adapter(ddp, x, "ddp", rank)
    # New lam parameters behind DDP's back would silently stop being synchronised: refused; an adapter already
    # loaded under its name is overwritten in place and stays synchronised.
    from qrlora_kernels import load_adapter
    folder = Path(os.environ["QRLORA_TEST_ADAPTER_DIR"]) / "ddp"
    try:
        load_adapter(ddp, folder, adapter_name="second")
        raise AssertionError("a new adapter was loaded into a DDP-wrapped model")
    except ValueError as err:
        assert "load adapters before wrapping the model in DistributedDataParallel" in str(err), err
    from qrlora_kernels import delete_adapter
    try:
        delete_adapter(ddp, "default")
        raise AssertionError("an adapter was deleted from a DDP-wrapped model")
    except ValueError as err:
        assert "delete adapters before wrapping the model in DistributedDataParallel" in str(err), err
    lam_before = [p for n, p in model.named_parameters() if n.endswith(".lam")]
    load_adapter(ddp, folder)
    assert [p for n, p in model.named_parameters() if n.endswith(".lam")] == lam_before  # the same Parameters


def _check_saved_adapter(wrapped, x, label, rank):
    """Every rank saves (rank 0 writes); the file, loaded into a plain base model, gives the wrapped model's outputs."""
    import torch.distributed as dist
    from qrlora_kernels import load_adapter, save_adapter
    folder = Path(os.environ["QRLORA_TEST_ADAPTER_DIR"]) / label
    with torch.no_grad():
        expected = wrapped(x)
    save_adapter(wrapped, folder)
    dist.barrier()  # rank 0's files are complete before anyone reads them
    plain = _base_model()
    load_adapter(plain, folder)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6, msg=f"{label} adapter reloaded on rank {rank}")


GLOO_AVG_SUMS = "NOTE gloo's reduce-scatter sums under ReduceOp.AVG"


def _gloo_reduce_scatter_averages(world) -> bool:
    """Whether gloo's reduce-scatter averages under ReduceOp.AVG. torch 2.7's and 2.8's sum instead,
    silently (pytorch/pytorch#162338), and FSDP2 reduces gradients with it: probed, not assumed from the version."""
    import torch.distributed as dist
    out = torch.empty(1)
    dist.reduce_scatter_tensor(out, torch.ones(world), op=dist.ReduceOp.AVG)
    return out.item() == 1.0


def _check_fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    model, x, target, expected = _converted_with_reference_grads(seed=5)
    if not _gloo_reduce_scatter_averages(world):  # torch's bug, for every model: ours must still give the sum
        expected = {name: grad * world for name, grad in expected.items()}
        if rank == 0:
            print(f"{GLOO_AVG_SUMS} in torch {torch.__version__} (pytorch/pytorch#162338): FSDP2's gradients "
                  f"are compared with the sum over ranks", flush=True)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    share = slice(2 * rank, 2 * rank + 2)
    (model(x[share]) - target[share]).square().mean().backward()
    sharded = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert isinstance(p.grad, DTensor)
            sharded += 1
            torch.testing.assert_close(p.grad.full_tensor(), expected[name], rtol=1e-5, atol=1e-7,
                                       msg=f"FSDP2 grad of {name}")
    assert sharded == 9
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01).step()
    (model(x[share]) - target[share]).square().mean().backward()  # a second step runs on updated shards
    _check_saved_adapter(model, x, "fsdp2", rank)
    from qrlora_kernels import delete_adapter
    try:
        delete_adapter(model, "default")
        raise AssertionError("an adapter was deleted from an FSDP2-sharded model")
    except ValueError as err:
        assert "delete adapters before wrapping the model in FSDP2" in str(err), err


def _check_fsdp2_checkpoints(rank, world):
    """torch.distributed.checkpoint's ways of saving an FSDP2 model: the full state dict (get_model_state_dict)
    is the unsharded model's own, and a sharded DCP save or a full state dict broadcast from rank 0
    (set_model_state_dict fills the parameters directly, not through load_state_dict) restore a model converted
    from the same base, lam included."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from qrlora_kernels import QRLoraConfig, apply_qrlora

    def sharded(with_lam: bool):
        model = _base_model()
        apply_qrlora(model, QRLoraConfig(target_modules=["query", "value", "up"], tau=0.8), progress=False)
        if with_lam:
            _set_lam(model)
        unsharded = {k: v.clone() for k, v in model.state_dict().items()}
        for block in model.layers:
            fully_shard(block)
        return fully_shard(model), unsharded

    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    model, unsharded = sharded(with_lam=True)
    with torch.no_grad():
        expected = model(x)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert full.keys() == unsharded.keys(), sorted(set(full) ^ set(unsharded))
        for key, value in unsharded.items():
            assert torch.equal(full[key], value), f"full state dict: {key}"
    folder = Path(os.environ["QRLORA_TEST_ADAPTER_DIR"]) / "dcp"
    dcp.save({"model": model.state_dict()}, checkpoint_id=folder)
    restored, _ = sharded(with_lam=False)
    state = {"model": restored.state_dict()}
    dcp.load(state, checkpoint_id=folder)
    restored.load_state_dict(state["model"])
    broadcast, _ = sharded(with_lam=False)
    set_model_state_dict(broadcast, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for label, model in (("dcp.load", restored), ("set_model_state_dict", broadcast)):
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-7, msg=f"{label} on rank {rank}")


def _check_fsdp1(rank, world):
    """FSDP1 flattens parameters: a save outside summon_full_params is refused (it wrote flat shards); inside it,
    the file names the plain modules and reloads into a plain model."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from qrlora_kernels import save_adapter
    model, x, _, _ = _converted_with_reference_grads(seed=11)
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}),
                                       device_id=torch.device("cpu"), use_orig_params=True)
    folder = Path(os.environ["QRLORA_TEST_ADAPTER_DIR"]) / "fsdp1"
    try:
        save_adapter(wrapped, folder)
        raise AssertionError("save_adapter wrote an FSDP1 model's flattened shards")
    except ValueError as err:
        assert "flattened or sharded" in str(err), err
    import torch.distributed as dist
    from qrlora_kernels import load_adapter
    with torch.no_grad():
        expected = wrapped(x)  # a forward inside summon_full_params would reshard the parameters
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        save_adapter(wrapped, folder)
    dist.barrier()
    plain = _base_model()
    load_adapter(plain, folder)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6, msg=f"fsdp1 adapter on rank {rank}")


# FSDP2 on CPU tensors needs CPU streams with record_event (torch 2.6's have none: its FSDP2 needs a GPU).
FSDP2_ON_CPU = hasattr(torch.cpu.Stream, "record_event")


def main():
    import torch.distributed as dist
    torch.set_num_threads(1)  # the same BLAS path on every rank and in the single-process reference
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates every group
    _SINGLE["group"], _SINGLE["groups"] = groups[rank], groups
    for check in (_check_apply, _check_ranks_fail_and_disagree_together, _check_ddp, _check_fsdp2, _check_fsdp2_checkpoints, _check_fsdp1):
        if check in (_check_fsdp2, _check_fsdp2_checkpoints) and not FSDP2_ON_CPU:
            if rank == 0:
                print(f"SKIPPED {check.__name__}", flush=True)
            continue
        check(rank, world)
        dist.barrier()
        if rank == 0:
            print(f"PASSED {check.__name__}", flush=True)
    dist.destroy_process_group()


def test_apply_ddp_and_fsdp2_under_torchrun(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", QRLORA_TEST_ADAPTER_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=root)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"torchrun failed (exit {done.returncode}):\n{log[-6000:]}"
    for name in ("_check_apply", "_check_ranks_fail_and_disagree_together", "_check_ddp", "_check_fsdp2", "_check_fsdp2_checkpoints", "_check_fsdp1"):
        if name.startswith("_check_fsdp2") and not FSDP2_ON_CPU:
            assert f"SKIPPED {name}" in done.stdout, log[-3000:]
            continue
        assert f"PASSED {name}" in done.stdout, log[-3000:]
    if GLOO_AVG_SUMS in done.stdout:
        warnings.warn(f"torch {torch.__version__}: gloo's reduce-scatter sums under ReduceOp.AVG "
                      f"(pytorch/pytorch#162338), so FSDP2 on CPU sums gradients over ranks; the test compared them "
                      f"with that sum")
    if not FSDP2_ON_CPU:
        pytest.skip(f"the FSDP2 part only: torch {torch.__version__}'s FSDP2 needs a GPU (CPU streams have no "
                    f"record_event); process groups, DDP and FSDP1 passed")
    assert sorted(p.name for p in (tmp_path / "fsdp2").iterdir()) == ["adapter.safetensors", "adapter_config.json"]


if __name__ == "__main__":
    main()
