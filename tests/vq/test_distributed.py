"""Data-parallel behaviour on two gloo CPU ranks: EMA statistics and k-means init all-reduce, so ranks agree."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.vq import ResidualVQ, VectorQuantize


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial codebook on every rank, as DDP would ensure
        ema = VectorQuantize(dim=4, codebook_size=8, decay=0.5)
        restarts = VectorQuantize(dim=4, codebook_size=32, kmeans_init=True, dead_code_threshold=3.0, decay=0.5)
        rvq = ResidualVQ(dim=4, num_quantizers=4, codebook_size=4, quantizer_dropout=1.0, vq={"ema": False})
        data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(100 + rank)  # ranks' private RNG streams differ from here on
        local = data[rank::world]  # each rank sees half the batch
        for _ in range(3):
            ema(local)
            restarts(local + 0.1 * torch.randn_like(local))
        # 12 draws of n ~ U{1..4}: all equal (which would hide a per-rank draw) with chance 4^-11 at any seed.
        active = [int((rvq(local).indices >= 0).all(0).sum()) for _ in range(12)]
        torch.save(
            {"ema": ema.embed, "restarts": restarts.embed, "sizes": restarts.cluster_size, "active": active},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # Every rank holds the same codebooks: k-means seeds and restarts come from rank 0, statistics are summed.
    for key in ("ema", "restarts", "sizes"):
        torch.testing.assert_close(r0[key], r1[key])
    assert r0["active"] == r1["active"] and len(set(r0["active"])) > 1  # one dropout draw for all ranks
    # The EMA update over two half-batches equals one process updating on the whole batch.
    torch.manual_seed(0)
    single = VectorQuantize(dim=4, codebook_size=8, decay=0.5)
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        single(data)
    torch.testing.assert_close(r0["ema"], single.embed)
