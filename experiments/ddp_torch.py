#!/usr/bin/env python3
"""PyTorch DDP reference for experiments/scaling.sh: one rank of a data-parallel training run.

Trains the model of configs/mlp2048.yaml (784-2048-2048-10, ReLU, fp32) with DistributedDataParallel
over gloo, as a PyTorch user would (default DDP buckets), either plain fp32 all-reduce (--hook none)
or with PyTorch's fp16 compression hook (--hook fp16: default_hooks.fp16_compress_hook). The batch
(64 images per rank of Fashion-MNIST's shape, synthetic), optimizer (SGD lr 0.05, momentum 0.9,
weight decay 1e-4) and threads (1) match scaling.sh's int4ddp runs. Debian's python3-torch calls the
system BLAS: install an optimised one (libopenblas0-pthread), the reference libblas3 is about 20x
slower.

Started once per rank, e.g. under mpirun on the simulated cluster (launch/netns_cluster.sh mpirun
... -- python3 experiments/ddp_torch.py --master-addr 10.213.0.1): the rank and world size come
from --rank/--world-size or mpirun's OMPI_COMM_WORLD_RANK/SIZE; --ifname pins gloo to an interface
("{rank}" is replaced by the rank, e.g. i4dp{rank} inside the cluster's namespaces).

Timing: wall time of each step (forward, backward with DDP's overlapped all-reduce, optimizer step);
step_s is the median over the steps after --warmup, on rank 0. compute_s: the median of --compute-steps
further steps under model.no_sync() (no all-reduce), the compute part of a step.

Prints one human-readable line and ends with one JSON line on rank 0:
  {"bench":"ddp_torch","torch":V,"backend":"gloo","hook":"none"|"fp16","model":"mlp2048",
   "ranks":N,"batch":64,"steps":S,"warmup":W,"step_s":T,"compute_s":C}
Exit status 3 when torch is not installed (Debian: apt-get install python3-torch).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time



def mlp(nn, hidden):
    layers, cin = [nn.Flatten()], 28 * 28
    for h in hidden:
        layers += [nn.Linear(cin, h), nn.ReLU()]
        cin = h
    layers.append(nn.Linear(cin, 10))
    return nn.Sequential(*layers)


def env_int(names, what):
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    sys.exit(f"ddp_torch: no {what}: pass --{what} or start under mpirun")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hook", choices=["none", "fp16"], default="none")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compute-steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="images per rank")
    p.add_argument("--hidden", default="2048,2048")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int)
    p.add_argument("--world-size", type=int)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29517)
    p.add_argument("--ifname", help="gloo's interface ({rank} -> the rank)")
    a = p.parse_args()
    if a.steps <= a.warmup or a.warmup < 0 or a.batch < 1 or a.compute_steps < 1:
        sys.exit("ddp_torch: need --steps > --warmup >= 0, --batch >= 1, --compute-steps >= 1")
    rank = a.rank if a.rank is not None else env_int(["OMPI_COMM_WORLD_RANK", "RANK"], "rank")
    world = (a.world_size if a.world_size is not None
             else env_int(["OMPI_COMM_WORLD_SIZE", "WORLD_SIZE"], "world-size"))
    if a.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = a.ifname.replace("{rank}", str(rank))
    # The BLAS's own thread pool (Debian's torch calls the system BLAS) is sized before import.
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(a.threads)
    try:
        import torch
        import torch.distributed as dist
        import torch.nn as nn
        import torch.nn.functional as F
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        print("ddp_torch: PyTorch is not installed (apt-get install python3-torch)",
              file=sys.stderr)
        sys.exit(3)
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master_addr}:{a.master_port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))

    torch.manual_seed(1)  # DDP broadcasts rank 0's parameters anyway
    model = DistributedDataParallel(mlp(nn, [int(h) for h in a.hidden.split(",")]))
    if a.hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(a.batch, 1, 28, 28, generator=g),
                torch.randint(0, 10, (a.batch,), generator=g)) for _ in range(4)]

    def step(i):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    times = [step(i) for i in range(a.steps)]
    with model.no_sync():
        compute = [step(i) for i in range(a.compute_steps)]
    dist.barrier()
    if rank == 0:
        r = {"bench": "ddp_torch", "torch": torch.__version__, "backend": "gloo", "hook": a.hook,
             "model": "mlp2048" if a.hidden == "2048,2048" else "mlp-" + a.hidden,
             "ranks": world, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
             "step_s": statistics.median(times[a.warmup:]),
             "compute_s": statistics.median(compute)}
        print(f"ddp_torch: torch {r['torch']} gloo, hook {a.hook}, {world} rank(s), batch {a.batch}: "
              f"step {1e3 * r['step_s']:.1f} ms, compute {1e3 * r['compute_s']:.1f} ms (median)")
        print(json.dumps(r), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
