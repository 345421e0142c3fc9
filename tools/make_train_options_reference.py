#!/usr/bin/env python3
"""PyTorch's side of bnlab's training options, written to tests/fixtures/train_options.json.

- the learning rates of OneCycleLR (cycle_momentum=False), CosineAnnealingLR and StepLR, step
  by step, for the closed forms in RunConfig::lr_at_step;
- three steps of SGD (momentum 0.9, Nesterov, weight decay) and of Adam (weight decay) on a
  Linear(4, 3) with a label-smoothed cross-entropy, the learning rate moving by OneCycleLR:
  the weights after each step, float64.

Run with a Python that has torch: python3 tools/make_train_options_reference.py
"""
import json
import math
import pathlib

import torch

torch.set_default_dtype(torch.float64)


def lrs(make, lr, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def schedules():
    cases = []
    for total, pct in [(20, 0.3), (37, 0.25), (10, 0.5)]:
        cases.append({
            "schedule": "one-cycle", "lr": 0.8, "warmup": pct, "total": total,
            "lrs": lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
                o, max_lr=0.8, total_steps=total, pct_start=pct, anneal_strategy="cos",
                cycle_momentum=False, div_factor=25.0, final_div_factor=1e4), 0.8, total),
        })
    for total in [12, 25]:
        cases.append({
            "schedule": "cosine", "lr": 0.5, "warmup": 0.0, "total": total,
            "lrs": lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total), 0.5, total),
        })
    # StepLR stepped once per epoch: its lr per epoch.
    cases.append({
        "schedule": "step", "lr": 0.5, "step_size": 2, "gamma": 0.9, "total": 7,
        "lrs": lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.9), 0.5, 7),
    })
    return cases


def steps(optimizer):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    start = {"weight": layer.weight.detach().tolist(), "bias": layer.bias.detach().tolist()}
    if optimizer == "sgd-momentum":
        opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, nesterov=True,
                              weight_decay=0.01)
    else:
        opt = torch.optim.Adam(layer.parameters(), lr=0.5, eps=1e-8, weight_decay=0.01)
    total = 3
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=total,
                                                pct_start=0.5, cycle_momentum=False)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    after = []
    for _ in range(total):
        opt.zero_grad()
        loss = loss_fn(layer(x), y)
        loss.backward()
        opt.step()
        sched.step()
        after.append({"loss": loss.item(), "weight": layer.weight.detach().tolist(),
                      "bias": layer.bias.detach().tolist()})
    return {"optimizer": optimizer, "lr": 0.5, "momentum": 0.9, "nesterov": optimizer == "sgd-momentum",
            "weight_decay": 0.01, "label_smoothing": 0.1, "warmup": 0.5, "total": total,
            "x": x.tolist(), "y": y.tolist(), "start": start, "after": after}


out = {
    "torch": torch.__version__,
    "schedules": schedules(),
    "steps": [steps("sgd-momentum"), steps("adam")],
}
path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/train_options.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
