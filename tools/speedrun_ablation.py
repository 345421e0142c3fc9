#!/usr/bin/env python3
"""The speedrun recipe and its ablation: each variant for several seeds, one run at a time (so
that each has the whole machine, as the 180 s target assumes), then a table and a plot.

    python3 tools/speedrun_ablation.py --bnlab target/release/bnlab --out runs/ablation
    python3 tools/speedrun_ablation.py --out runs/ablation --report-only

Finished runs (a model.bpk in their directory) are not run again. Writes OUT/table.md (mean ±
std, min and max over seeds of the final test accuracy and of the wall time) and
OUT/accuracy-vs-time.svg (test accuracy against wall time, one line per run, a colour per
variant). Standard library only.
"""
import argparse
import json
import math
import pathlib
import statistics
import subprocess
import sys

# (name, recipe, extra flags): the recipe, then each trick removed on its own.
VARIANTS = [
    ("speedrun", "speedrun", []),
    ("no BN", "speedrun", ["--norm", "none"]),
    # Without BN the recipe's lr does not train at all; a fair comparison also gives it an lr
    # that a network without BN can take.
    ("no BN, lr 0.05", "speedrun", ["--norm", "none", "--lr", "0.05"]),
    ("constant lr (no one-cycle)", "speedrun", ["--lr-schedule", "constant"]),
    ("no label smoothing", "speedrun", ["--label-smoothing", "0"]),
    ("no flips", "speedrun", ["--augment-flip=false"]),
    ("no precise BN", "speedrun", ["--recalibrate-bn=false"]),
]
# Flip TTA changes only the test pass, so its rows test these variants' own models without it
# (bnlab eval --tta-flip=false): the same weights, paired. Without flips in training, TTA shows
# the model mirrored images it never saw.
NO_TTA_OF = ["speedrun", "no flips"]
COLOURS = ["#1f77b4", "#d62728", "#bcbd22", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_dir(out, variant, seed):
    return out / f"{slug(variant)}-seed{seed}"


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]


def run_all(args, variants):
    for name, recipe, flags in variants:
        for seed in args.seeds:
            d = run_dir(args.out, name, seed)
            if (d / "model.bpk").is_file():
                continue
            if (d / "diverged.txt").is_file():
                continue
            cmd = [args.bnlab, "run", recipe, *flags, "--seed", str(seed), "--out", str(d)]
            print(" ".join(cmd), flush=True)
            done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
            sys.stderr.write(done.stderr)
            if done.returncode != 0:
                # bnlab stops a run whose loss blows up and says so: a result of the variant
                # (counted in the table), not a failure of the script.
                if "diverged" not in done.stderr:
                    raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode})")
                (d / "diverged.txt").write_text(done.stderr)
    for name, seed in [(n, s) for n in NO_TTA_OF for s in args.seeds]:
        d = run_dir(args.out, name, seed)
        if (d / "model.bpk").is_file() and not (d / "eval-no-tta.json").is_file():
            cmd = [args.bnlab, "eval", "--checkpoint", str(d), "--tta-flip=false", "--json"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            (d / "eval-no-tta.json").write_text(out)


def fmt(values, digits):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}", f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"


def report(args, variants):
    rows, lines, tta_rows = [], [], []
    for i, (name, recipe, flags) in enumerate(variants):
        finals, walls, epochs, cut, diverged = [], [], [], 0, 0
        for seed in args.seeds:
            d = run_dir(args.out, name, seed)
            diverged += (d / "diverged.txt").is_file()
            if not (d / "model.bpk").is_file():
                continue
            m = metrics(d)
            finals.append(m[-1]["test_acc"])
            walls.append(m[-1]["elapsed"])
            epochs.append(m[-1]["epoch"])
            # The budget ended the last epoch early: it took far less than the others.
            if len(m) > 1 and m[-1]["seconds"] < 0.8 * statistics.median(e["seconds"] for e in m[:-1]):
                cut += 1
            # Epochs that --test-every left untested (test_acc null) have no point.
            lines.append((i, [(e["elapsed"], e["test_acc"]) for e in m if e["test_acc"] is not None]))
        if not finals:
            if diverged:
                rows.append(f"| {name} | `{' '.join(flags)}` | 0 | | | | | | | | {diverged} |")
            continue
        if name in NO_TTA_OF:
            no_tta = [json.loads((run_dir(args.out, name, seed) / "eval-no-tta.json").read_text())["test_acc"]
                      for seed in args.seeds if (run_dir(args.out, name, seed) / "eval-no-tta.json").is_file()]
            if no_tta:
                a, lo, hi = fmt(no_tta, 4)
                reached = sum(v >= args.target for v in no_tta)
                tta_rows.append(f"| {name}, tested without flip TTA (same models) | `eval --tta-flip=false` | "
                                f"{len(no_tta)} | {a} | {lo} | {hi} | {reached}/{len(no_tta)} | | | | |")
        acc, acc_min, acc_max = fmt(finals, 4)
        wall, _, wall_max = fmt(walls, 1)
        flags_text = " ".join(flags) or "(as the recipe)"
        reached = sum(a >= args.target for a in finals)
        rows.append(f"| {name} | `{flags_text}` | {len(finals)} | {acc} | {acc_min} | {acc_max} | "
                    f"{reached}/{len(finals)} | {wall} | {wall_max} | {cut}/{len(finals)} | {diverged} |")
    table = ("| variant | flags | seeds | final test acc (mean ± std) | min | max | "
             f"≥ {args.target} | wall time, s (mean ± std) | max | last epoch cut by the budget | "
             "diverged (not in the other columns) |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows + tta_rows) + "\n")
    (args.out / "table.md").write_text(table)
    print(table)
    (args.out / "accuracy-vs-time.svg").write_text(svg(lines, variants, args.target))


def svg(lines, variants, target):
    w, h, left, bottom, top, right = 720, 440, 60, 40, 20, 230
    t_max = max((t for _, pts in lines for t, _ in pts), default=1.0)
    t_max = math.ceil(t_max / 30) * 30
    a_min, a_max = 0.80, 0.95
    x = lambda t: left + (w - left - right) * t / t_max
    y = lambda a: top + (h - top - bottom) * (1 - (min(max(a, a_min), a_max) - a_min) / (a_max - a_min))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for k in range(0, int(t_max) + 1, 30):
        out.append(f'<line x1="{x(k):.1f}" y1="{top}" x2="{x(k):.1f}" y2="{h - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x(k):.1f}" y="{h - bottom + 15}" text-anchor="middle">{k}</text>')
    for k in range(80, 96):
        a = k / 100
        out.append(f'<line x1="{left}" y1="{y(a):.1f}" x2="{w - right}" y2="{y(a):.1f}" stroke="#eee"/>')
        if k % 2 == 0:
            out.append(f'<text x="{left - 5}" y="{y(a) + 4:.1f}" text-anchor="end">{a:.2f}</text>')
    out.append(f'<line x1="{left}" y1="{y(target):.1f}" x2="{w - right}" y2="{y(target):.1f}" stroke="black" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 5}" text-anchor="middle">wall time, s (test passes included)</text>')
    out.append(f'<text x="15" y="{(top + h - bottom) / 2}" transform="rotate(-90 15 {(top + h - bottom) / 2})" text-anchor="middle">test accuracy (clipped to 0.80-0.95)</text>')
    for i, pts in lines:
        path = " ".join(f"{x(t):.1f},{y(a):.1f}" for t, a in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS[i % len(COLOURS)]}" stroke-width="1.5"/>')
        # A run tested only at its end is a point, not a line.
        out.extend(f'<circle cx="{x(t):.1f}" cy="{y(a):.1f}" r="2.5" fill="{COLOURS[i % len(COLOURS)]}"/>' for t, a in pts)
    for i, (name, _, _) in enumerate(variants):
        ly = top + 10 + 18 * i
        out.append(f'<line x1="{w - right + 10}" y1="{ly}" x2="{w - right + 30}" y2="{ly}" stroke="{COLOURS[i % len(COLOURS)]}" stroke-width="2"/>')
        out.append(f'<text x="{w - right + 35}" y="{ly + 4}">{name}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bnlab", default="bnlab")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    p.add_argument("--target", type=float, default=0.930)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args, variants)
    report(args, variants)


if __name__ == "__main__":
    sys.exit(main())
