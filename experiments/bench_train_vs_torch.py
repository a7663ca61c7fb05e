#!/usr/bin/env python3
"""bench_train beside PyTorch, measured in the same run (issue 3's throughput target).

For each model and thread count, runs `bench_train` (ours: fp32 and 4/4/4) and
`bench_train_torch.py` (PyTorch fp32, same models, batch 128, 1x28x28, SGD step) alternately,
--rounds times, and prints the median (and range) of each, the ratio ours/PyTorch for fp32, and
our 4/4/4 against our fp32. With --bf16 PyTorch also runs with bf16 autocast (AMX or
AVX512-BF16 where the CPU has them: the fastest CPU training a user would pick), and our 4/4/4 is
compared with it. Ends with one JSON line:
  {"bench":"train_vs_torch","torch":..,"rows":[{"model","threads","ours_fp32","ours_444",
   "torch_fp32","fp32_vs_torch","q444_vs_fp32"[,"torch_bf16","q444_vs_torch_bf16"]},...]}

Usage: experiments/bench_train_vs_torch.py [--build DIR] [--model M ...] [--threads T ...]
           [--rounds R] [--steps S] [--reps P] [--bf16]
Needs PyTorch for the interpreter that runs bench_train_torch.py (--python, default: the first of
python3 and /usr/bin/python3 that imports torch; Debian: apt-get install python3-torch).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def last_json(out, what):
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.exit("bench_train_vs_torch: no JSON line from %s" % what)


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit("bench_train_vs_torch: %s failed (exit %d): %s" %
                 (" ".join(cmd), p.returncode, p.stderr.strip()[-500:]))
    return p.stdout


def torch_python(explicit):
    for py in ([explicit] if explicit else ["python3", "/usr/bin/python3"]):
        if subprocess.run([py, "-c", "import torch"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0:
            return py
    sys.exit("bench_train_vs_torch: no python with torch (apt-get install python3-torch)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.environ.get("INT4DDP_BUILD", os.path.join(ROOT, "build")))
    ap.add_argument("--model", action="append", choices=["mlp", "cnn", "resnet20"])
    ap.add_argument("--threads", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--python")
    ap.add_argument("--bf16", action="store_true", help="add PyTorch bf16 autocast rows")
    a = ap.parse_args()
    if a.rounds < 1 or a.steps < 1 or a.reps < 1 or any(t < 1 for t in (a.threads or [])):
        ap.error("--rounds, --steps, --reps and --threads must be >= 1")
    bench = os.path.join(a.build, "experiments", "bench_train")
    if not os.access(bench, os.X_OK):
        sys.exit("bench_train_vs_torch: %s not found; build it (cmake --build %s --target "
                 "bench_train)" % (bench, a.build))
    py = torch_python(a.python)
    models = a.model or ["cnn", "resnet20"]
    threads = a.threads or [1, 2]
    common = ["--steps", str(a.steps), "--reps", str(a.reps)]
    torch_version = None
    rows = []
    print("# ours (%s) vs PyTorch, batch 128, 1x28x28, SGD step included; median (min-max) of %d "
          "alternating rounds, each the best of %d x %d steps; img/s" % (bench, a.rounds, a.reps,
                                                                         a.steps))
    print("%-9s %3s %22s %22s %22s %9s %9s" % ("model", "thr", "ours fp32", "ours 4/4/4",
                                               "torch fp32", "fp32/pt", "444/fp32") +
          (" %22s %9s" % ("torch bf16", "444/bf16") if a.bf16 else ""))
    precisions = ["--precision", "fp32"] + (["--precision", "bf16"] if a.bf16 else [])
    for m in models:
        for t in threads:
            ours32, ours4, ref, ref16 = [], [], [], []
            for _ in range(a.rounds):
                o = last_json(run([bench, "--model", m, "--threads", str(t)] + common), "bench_train")
                for r in o["rows"]:
                    (ours32 if r["bits"] == "fp32" else ours4).append(r["img_per_s"])
                p = last_json(run([py, os.path.join(HERE, "bench_train_torch.py"), "--model", m,
                                   "--threads", str(t)] + precisions + common),
                              "bench_train_torch.py")
                torch_version = p["torch"]
                for r in p["rows"]:
                    (ref if r["bits"] == "fp32" else ref16).append(r["img_per_s"])

            def cell(v):
                return "%.0f (%.0f-%.0f)" % (statistics.median(v), min(v), max(v))

            o32, o4, pt = (statistics.median(v) for v in (ours32, ours4, ref))
            row = {"model": m, "threads": t, "ours_fp32": round(o32, 1),
                   "ours_444": round(o4, 1), "torch_fp32": round(pt, 1),
                   "fp32_vs_torch": round(o32 / pt, 3), "q444_vs_fp32": round(o4 / o32, 3)}
            line = "%-9s %3d %22s %22s %22s %8.2fx %8.2fx" % (m, t, cell(ours32), cell(ours4),
                                                             cell(ref), o32 / pt, o4 / o32)
            if ref16:
                p16 = statistics.median(ref16)
                row.update({"torch_bf16": round(p16, 1), "q444_vs_torch_bf16": round(o4 / p16, 3)})
                line += " %22s %8.2fx" % (cell(ref16), o4 / p16)
            rows.append(row)
            print(line, flush=True)
    print(json.dumps({"bench": "train_vs_torch", "torch": torch_version, "rows": rows}))


if __name__ == "__main__":
    main()
