"""Data-parallel runs: shards, batch sampling, and 2 gloo processes against 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEMO, REPO, assert_close_tree

from spherical_cl.distributed import DistributedContext, ShardedBatchSampler
from spherical_cl.results import MEASUREMENT_KEYS

# Short and at a small learning rate: float32 rounding differs between 1 and 2 processes
# (batch shapes, summation order), and long training at a high rate amplifies it.
DDP_RUN = ["logging.progress=false", "data.num_tasks=2", "data.class_order=identity", "data.class_list=null",
           "data.augment=none", "train.epochs_warm=1", "train.epochs_main=1", "train.lr=1e-3"]


@pytest.mark.parametrize("count, world", [(10, 1), (10, 3), (7, 2), (2, 2), (1000, 8)])
def test_shards_cover_range_in_order(count, world):
    shards = [DistributedContext(rank=r, world_size=world).shard(count) for r in range(world)]
    assert [i for shard in shards for i in shard] == list(range(count))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_sampler_shares_make_up_global_batches():
    single = list(ShardedBatchSampler(103, 16, seed=5))
    assert sorted(i for batch in single for i in batch) == list(range(103))
    assert [len(batch) for batch in single] == [16] * 6 + [7]
    ranks = [list(ShardedBatchSampler(103, 16, seed=5, context=DistributedContext(rank=r, world_size=3)))
             for r in range(3)]
    for step, batch in enumerate(single):
        assert sum((shares[step] for shares in ranks), []) == batch
    assert len(ShardedBatchSampler(103, 16, seed=5)) == 7


def test_sampler_drops_last_batch_smaller_than_world():
    sampler = ShardedBatchSampler(33, 16, seed=0, context=DistributedContext(rank=0, world_size=4))
    assert len(list(sampler)) == 2
    assert len(sampler) == 2


def test_sampler_epochs_differ_and_repeat():
    sampler = ShardedBatchSampler(50, 8, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert second != first


def test_single_process_context_is_identity():
    context = DistributedContext()
    x = torch.randn(5, 3, requires_grad=True)
    assert context.gather_rows_with_grad(x) is x
    assert context.gather_rows(x) is x
    assert context.all_true(False, torch.device("cpu")) is False


def run_config(run_dir, method: str, processes: int) -> subprocess.CompletedProcess:
    args = ["-m", "spherical_cl.train", "--config", str(DEMO), "--run-dir", str(run_dir), f"method={method}",
            *DDP_RUN]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=environment)


@pytest.mark.parametrize("method", ["drs_sphere", "linear_drs"])
def test_two_gloo_ranks_match_one_process(tmp_path, method):
    from safetensors.torch import load_file

    single, double = tmp_path / "one", tmp_path / "two"
    for run_dir, processes in ((single, 1), (double, 2)):
        result = run_config(run_dir, method, processes)
        assert result.returncode == 0, result.stderr[-3000:]

    one_rank = json.loads((single / "metrics.json").read_text())
    two_ranks = json.loads((double / "metrics.json").read_text())
    assert two_ranks["acc_matrix"] == one_rank["acc_matrix"]
    assert_close_tree({k: v for k, v in two_ranks.items() if k not in MEASUREMENT_KEYS},
                      {k: v for k, v in one_rank.items() if k not in MEASUREMENT_KEYS}, atol=1e-5)

    exports = sorted(p.name for p in (single / "exports").iterdir())
    assert exports == sorted(p.name for p in (double / "exports").iterdir())
    assert any("_U" in name for name in exports)
    for name in exports:
        expected, actual = load_file(single / "exports" / name), load_file(double / "exports" / name)
        for key, tensor in expected.items():
            if not tensor.is_floating_point():
                assert torch.equal(actual[key], tensor), (name, key)
            elif key == "U" or key.startswith("layer/"):
                # An eigenvector's sign is arbitrary, so compare the projectors U Uᵀ.
                torch.testing.assert_close(actual[key] @ actual[key].T, tensor @ tensor.T, atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(actual[key], tensor, atol=1e-5, rtol=0, msg=f"{name} {key}")

    # Only rank 0 writes: one record per epoch and task, and one set of checkpoints.
    records = [json.loads(line) for line in (double / "log.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "task" for r in records) == 2
    assert sum(r["type"] == "epoch" for r in records) == 4
    assert json.loads((double / "run_info.json").read_text())["hardware"]["world_size"] == 2
    assert sorted(p.name for p in (double / "checkpoints").iterdir()) == ["task_01.pt", "task_02.pt"]


def test_batch_smaller_than_world_is_rejected_early():
    from spherical_cl.config import load_config
    from spherical_cl.errors import ConfigError
    from trainers.experiment import _check_world_size

    config = load_config(DEMO, ["train.batch_size=3"])
    _check_world_size(config, DistributedContext(rank=0, world_size=3))
    with pytest.raises(ConfigError, match="train.batch_size=3 is smaller than the 4 ranks"):
        _check_world_size(config, DistributedContext(rank=0, world_size=4))


def test_sampler_global_batch_sizes_sum_shares():
    ranks = [ShardedBatchSampler(103, 16, seed=5, context=DistributedContext(rank=r, world_size=3)) for r in range(3)]
    for index, shares in enumerate(zip(*ranks)):
        assert sum(len(share) for share in shares) == ranks[0].global_batch_size(index)
