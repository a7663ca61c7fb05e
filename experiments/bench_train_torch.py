#!/usr/bin/env python3
"""PyTorch reference for experiments/bench_train: the same models, batch and step, on the CPU.

Training throughput (img/s) at batch 128 on 1x28x28 inputs, forward + backward + SGD step
(momentum 0.9, weight decay 5e-4), fp32, for mlp (784-512-512-10), cnn and resnet20 as
src/nn/model.cpp builds them (bias-free convolutions, option-A shortcuts, the final BatchNorm after
global average pooling). One warm-up step, then the best of --reps runs of --steps steps, with
torch.set_num_threads(T) for each T of --threads.

Prints a table and ends with one JSON line:
  {"bench":"train_torch","torch":"1.13.1","rows":[{"model","bits":"fp32","threads","img_per_s"},...]}
Exit status 3 when torch is not installed (Debian: apt-get install python3-torch).
"""
import argparse
import json
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("bench_train_torch: PyTorch is not installed (apt-get install python3-torch)",
          file=sys.stderr)
    sys.exit(3)


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = x
        if self.stride != 1 or self.pad:  # option A: subsample, zero-pad the new channels
            s = x[:, :, ::self.stride, ::self.stride]
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(y + s)


def resnet20():
    layers = [conv3x3(1, 16), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for stage in range(3):
        cout = 16 << stage
        for b in range(3):
            layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def cnn():
    return nn.Sequential(
        conv3x3(1, 32), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        conv3x3(32, 64), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 10))


MODELS = {"mlp": mlp, "cnn": cnn, "resnet20": resnet20}


def bench(name, threads, steps, reps, batch=128):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), action="append")
    ap.add_argument("--threads", type=int, action="append")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if a.steps < 1 or a.reps < 1 or any(t < 1 for t in (a.threads or [])):
        ap.error("--steps, --reps and --threads must be >= 1")
    models = a.model or ["mlp", "cnn", "resnet20"]
    threads = a.threads or [1, 2]
    print("# bench_train_torch: torch %s, batch 128, 1x28x28, SGD step included, best of %d x %d"
          " steps" % (torch.__version__, a.reps, a.steps))
    print("%-10s %-6s %8s %12s %12s" % ("model", "bits", "threads", "ms/step", "img/s"))
    rows = []
    for m in models:
        for t in threads:
            s = bench(m, t, a.steps, a.reps)
            rows.append({"model": m, "bits": "fp32", "threads": t, "img_per_s": round(128 / s, 1)})
            print("%-10s %-6s %8d %12.1f %12.1f" % (m, "fp32", t, 1e3 * s, 128 / s), flush=True)
    print(json.dumps({"bench": "train_torch", "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
