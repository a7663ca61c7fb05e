#!/usr/bin/env python3
"""PyTorch reference for experiments/bench_train: the same models, batch and step.

Training throughput (img/s) at batch 128 on 1x28x28 inputs by default (--batch, --input CxHxW),
forward + backward + SGD step (momentum 0.9, weight decay 5e-4), for mlp (784-512-512-10), cnn,
resnet20 and resnet18 as src/nn/model.cpp builds them (bias-free convolutions, option-A shortcuts
and the final BatchNorm after global average pooling in resnet20; resnet18 with 1x1 projection
shortcuts, a CIFAR-style stem up to 64x64 inputs and an ImageNet-style one above). One warm-up step
(two with --compile), then the best of --reps runs of --steps steps.

--device cpu (default) runs with torch.set_num_threads(T) for each T of --threads; --device cuda
runs on GPU 0 with TF32 off for matmuls and convolutions (as int4ddp's fp32 cuBLAS GEMMs) and
cudnn.benchmark on (PyTorch's fastest convolution choice), synchronising before every clock read.
--precision bf16 wraps forward and loss in torch.autocast (bf16; on the CPU the AMX/AVX512-BF16
path where the CPU has it), the mixed precision a user would pick; --compile runs the model through
torch.compile (PyTorch 2.x).

Prints a table and ends with one JSON line:
  {"bench":"train_torch","torch":"1.13.1","device":"cpu","rows":[{"model","bits","threads",
   "img_per_s","batch","input","mode"},...]}  (bits: "fp32" or "bf16"; mode: "eager" or "compile")
Exit status 3 when torch is not installed (Debian: apt-get install python3-torch), 2 on a bad
argument (e.g. --device cuda without a GPU, --compile without torch.compile).
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
    """The ResNet basic block. Where the shape changes the shortcut is option A (subsample, zero-pad
    the new channels: resnet20) or, with projection, a 1x1 convolution + BN (resnet18)."""

    def __init__(self, cin, cout, stride, projection=False):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin
        self.projection = None
        if projection and (stride != 1 or cin != cout):
            self.projection = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = x
        if self.projection is not None:
            s = self.projection(x)
        elif self.stride != 1 or self.pad:
            s = x[:, :, ::self.stride, ::self.stride]
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(y + s)


def resnet20(channels=1, side=28):
    layers = [conv3x3(channels, 16), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for stage in range(3):
        cout = 16 << stage
        for b in range(3):
            layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def cnn(channels=1, side=28):
    return nn.Sequential(
        conv3x3(channels, 32), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        conv3x3(32, 64), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (side // 4) * (side // 4), 256), nn.ReLU(),
        nn.Linear(256, 10))


def mlp(channels=1, side=28):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


CIFAR_STEM_MAX_SIDE = 64  # src/nn/model.cpp kResNet18CifarStemMaxSide


def resnet18(channels=3, side=32):
    if side <= CIFAR_STEM_MAX_SIDE:
        layers = [conv3x3(channels, 64), nn.BatchNorm2d(64), nn.ReLU()]
    else:
        layers = [nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                  nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
    cin = 64
    for stage in range(4):
        cout = 64 << stage
        for b in range(2):
            layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1, projection=True))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


MODELS = {"mlp": mlp, "cnn": cnn, "resnet20": resnet20, "resnet18": resnet18}


def bench(name, threads, steps, reps, batch, shape, device, precision, compiled):
    if device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    channels, side = shape[0], shape[1]
    model = MODELS[name](channels, side).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fwd = torch.compile(model) if compiled else model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16,
                            enabled=precision == "bf16"):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()

    for _ in range(2 if compiled else 1):  # warm-up (and compilation)
        step()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), action="append")
    ap.add_argument("--threads", type=int, action="append")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--input", default="1x28x28", help="CxHxW, square (e.g. 3x32x32)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], action="append",
                    help="fp32 (default) and/or bf16 (torch.autocast)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    a = ap.parse_args()
    if a.steps < 1 or a.reps < 1 or a.batch < 1 or any(t < 1 for t in (a.threads or [])):
        ap.error("--steps, --reps, --batch and --threads must be >= 1")
    try:
        shape = tuple(int(v) for v in a.input.split("x"))
        assert len(shape) == 3 and min(shape) > 0 and shape[1] == shape[2]
    except (ValueError, AssertionError):
        ap.error("--input %s is not CxHxW with H = W (e.g. 3x32x32)" % a.input)
    if a.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: this torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    if a.compile and not hasattr(torch, "compile"):
        ap.error("--compile needs PyTorch 2.x (this is %s)" % torch.__version__)
    models = a.model or ["mlp", "cnn", "resnet20"]
    threads = (a.threads or [1, 2]) if a.device == "cpu" else [0]
    precisions = a.precision or ["fp32"]
    mode = "compile" if a.compile else "eager"
    where = ("GPU " + torch.cuda.get_device_name(0) + ", TF32 off") if a.device == "cuda" else "CPU"
    print("# bench_train_torch: torch %s, %s, %s, batch %d, %s, SGD step included, best of %d x %d"
          " steps" % (torch.__version__, where, mode, a.batch, a.input, a.reps, a.steps))
    print("%-10s %-6s %8s %12s %12s" % ("model", "bits", "threads", "ms/step", "img/s"))
    rows = []
    for m in models:
        for t in threads:
            for p in precisions:
                s = bench(m, t, a.steps, a.reps, a.batch, shape, a.device, p, a.compile)
                rows.append({"model": m, "bits": p, "threads": t,
                             "img_per_s": round(a.batch / s, 1), "batch": a.batch,
                             "input": a.input, "mode": mode})
                print("%-10s %-6s %8d %12.1f %12.1f" % (m, p, t, 1e3 * s, a.batch / s),
                      flush=True)
    print(json.dumps({"bench": "train_torch", "torch": torch.__version__, "device": a.device,
                      "rows": rows}))


if __name__ == "__main__":
    main()
