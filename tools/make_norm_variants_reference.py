#!/usr/bin/env python3
"""PyTorch's side of bnlab's norm variants, written to tests/fixtures/norm_variants.json.

For each case, in float64, one training step and one eval pass of:

- `mean-only` and `var-only`, the chapter's "lite" batch norm, written here from torch ops
  (PyTorch has no such layer): y = (x - mean) * gamma + beta and y = x / sqrt(var + eps) *
  gamma + beta, the statistics (and the running averages PyTorch's BatchNorm keeps: momentum
  0.1, unbiased running variance) those of the batch;
- `group:G`, `layer` and `instance`: torch.nn.GroupNorm(G, C), GroupNorm(1, C) and
  GroupNorm(C, C), the same in training and eval.

Each case records y, dx, dgamma and dbeta of (y * g).sum() for a random g, the running
statistics after the step, and the eval-mode output after it.

And `renorm`, batch renormalization (Ioffe, 2017), written here from torch ops: four training
steps on new inputs, with limits that widen as bnlab's RenormSchedule does (r_max 1.5, d_max
0.3, warm-up 1 step, ramp 2 steps) and running statistics far from the batches' so that the
clipping acts; per step y, dx, dgamma, dbeta and the running statistics after it.

Run with a Python that has torch: python3 tools/make_norm_variants_reference.py
"""
import json
import pathlib

import torch

torch.set_default_dtype(torch.float64)
EPS = 1e-5
MOMENTUM = 0.1


def lite(x, gamma, beta, running_mean, running_var, normalizer):
    axes = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    if normalizer == "mean-only":
        z = x - mean
    else:
        z = x / torch.sqrt(var + EPS)
    y = z * gamma.view(shape) + beta.view(shape)
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        new_mean = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.flatten()
        new_var = (1 - MOMENTUM) * running_var + MOMENTUM * var.flatten() * count / (count - 1)
    return y, new_mean, new_var


def lite_eval(x, gamma, beta, mean, var, normalizer):
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if normalizer == "mean-only":
        z = x - mean.view(shape)
    else:
        z = x / torch.sqrt(var.view(shape) + EPS)
    return z * gamma.view(shape) + beta.view(shape)


def flat(t):
    return t.detach().flatten().tolist()


def case(name, norm, shape, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen) * scale + shift).requires_grad_()
    g = torch.randn(shape, generator=gen)
    gamma = (1 + 0.5 * torch.randn(c, generator=gen)).requires_grad_()
    beta = (0.5 * torch.randn(c, generator=gen)).requires_grad_()
    out = {"name": name, "norm": norm, "shape": list(shape), "eps": EPS, "x": flat(x),
           "g": flat(g), "gamma": flat(gamma), "beta": flat(beta)}
    if norm in ("mean-only", "var-only"):
        running_mean = 0.1 * torch.randn(c, generator=gen)
        running_var = 1 + 0.2 * torch.rand(c, generator=gen)
        out["running_mean_before"] = flat(running_mean)
        out["running_var_before"] = flat(running_var)
        y, new_mean, new_var = lite(x, gamma, beta, running_mean, running_var, norm)
        out["running_mean_after"] = flat(new_mean)
        out["running_var_after"] = flat(new_var)
        y_eval = lite_eval(x, gamma, beta, new_mean, new_var, norm)
    else:
        groups = {"layer": 1, "instance": c}.get(norm) or int(norm.split(":")[1])
        gn = torch.nn.GroupNorm(groups, c, eps=EPS)
        with torch.no_grad():
            gn.weight.copy_(gamma)
            gn.bias.copy_(beta)
        gamma, beta = gn.weight, gn.bias
        y = gn(x)
        y_eval = gn.eval()(x)
    (y * g).sum().backward()
    out.update({"y": flat(y), "dx": flat(x.grad), "dgamma": flat(gamma.grad),
                "dbeta": flat(beta.grad), "y_eval": flat(y_eval)})
    return out


def renorm_limits(step, r_max, d_max, warmup, ramp):
    if step < warmup:
        return 1.0, 0.0
    t = 1.0 if ramp == 0 else min(1.0, (step - warmup) / ramp)
    return 1.0 + t * (r_max - 1.0), t * d_max


def renorm_case(name, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    schedule = {"r_max": 1.5, "d_max": 0.3, "warmup": 1, "ramp": 2}
    gamma = (1 + 0.5 * torch.randn(c, generator=gen)).requires_grad_()
    beta = (0.5 * torch.randn(c, generator=gen)).requires_grad_()
    running_mean = 0.4 + 0.1 * torch.randn(c, generator=gen)
    running_var = 0.3 + 0.1 * torch.rand(c, generator=gen)
    out = {"name": name, "shape": list(shape), "eps": EPS, "schedule": schedule,
           "gamma": flat(gamma), "beta": flat(beta), "running_mean_before": flat(running_mean),
           "running_var_before": flat(running_var), "steps": []}
    axes = [0] + list(range(2, len(shape)))
    view = [1, c] + [1] * (len(shape) - 2)
    count = 1
    for d in shape:
        count *= d
    count //= c
    for step in range(4):
        x = torch.randn(shape, generator=gen).requires_grad_()
        g = torch.randn(shape, generator=gen)
        r_max, d_max = renorm_limits(step, **schedule)
        mean = x.mean(dim=axes, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
        sigma_b = torch.sqrt(var + EPS)
        sigma = torch.sqrt(running_var + EPS).view(view)
        r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
        dd = ((mean - running_mean.view(view)) / sigma).clamp(-d_max, d_max).detach()
        y = ((x - mean) / sigma_b * r + dd) * gamma.view(view) + beta.view(view)
        gamma.grad = None
        beta.grad = None
        (y * g).sum().backward()
        with torch.no_grad():
            running_mean = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.flatten()
            running_var = ((1 - MOMENTUM) * running_var
                           + MOMENTUM * var.flatten() * count / (count - 1))
        out["steps"].append({
            "x": flat(x), "g": flat(g), "y": flat(y), "dx": flat(x.grad),
            "dgamma": flat(gamma.grad), "dbeta": flat(beta.grad),
            "running_mean_after": flat(running_mean), "running_var_after": flat(running_var),
        })
    return out


def main():
    cases = [
        case("mean_only_conv", "mean-only", (4, 3, 5, 5), 1),
        case("mean_only_fc", "mean-only", (16, 7), 2, scale=3.0, shift=2.0),
        case("var_only_conv", "var-only", (4, 3, 5, 5), 3, shift=1.5),
        case("var_only_fc", "var-only", (16, 7), 4, scale=0.2),
        case("group_conv", "group:2", (3, 6, 4, 4), 5),
        case("group_fc", "group:3", (5, 12), 6, scale=2.0),
        case("layer_conv", "layer", (3, 6, 4, 4), 7, shift=-1.0),
        case("instance_conv", "instance", (3, 4, 5, 5), 8),
    ]
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/norm_variants.json"
    renorm = [renorm_case("renorm_conv", (4, 3, 5, 5), 9), renorm_case("renorm_fc", (16, 7), 10)]
    fixture = {"torch": torch.__version__, "cases": cases, "renorm": renorm}
    path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {len(cases)} cases and {len(renorm)} renorm cases to {path}")


if __name__ == "__main__":
    main()
