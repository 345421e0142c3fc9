#!/usr/bin/env python3
"""Writes ../tests/fixtures/batchnorm_reference.json: PyTorch's batch normalization on small
tensors, in float64, as reference values for tests.

Each case holds the inputs (x, gamma, beta, running stats before, upstream gradient g),
the settings (momentum, eps, training), and what PyTorch computes: y, dx, dgamma, dbeta
(gradients of sum(y * g)), running_mean / running_var after the call, and y_eval (the
same x normalised in eval mode with the updated running stats).

Conventions are PyTorch's: running = (1 - momentum) * running + momentum * batch_stat;
running_var is updated with the UNBIASED batch variance (n / (n - 1)); the output is
normalised with the BIASED batch variance; momentum = null means a cumulative average
(factor 1 / num_batches_tracked). The "d2l_scratch" case follows the d2l chapter
instead: moving = 0.9 * moving + 0.1 * batch with the BIASED variance.

Run with a Python that has torch:  python make_bn_reference.py
"""
import json
import os

import torch

torch.manual_seed(20261123)
torch.set_default_dtype(torch.float64)


def lst(t):
    return t.detach().reshape(-1).tolist()


def layer_for(rank, c, **kw):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[rank](c, **kw)


def torch_case(name, x, momentum=0.1, eps=1e-5, affine=True, steps=1):
    c = x.shape[1]
    bn = layer_for(x.dim(), c, momentum=momentum, eps=eps, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(c) + 0.5)
            bn.bias.copy_(torch.randn(c) * 0.5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c) * 0.1)
        bn.running_var.copy_(torch.rand(c) + 0.5)
    case = {
        "name": name,
        "shape": list(x.shape),
        "momentum": momentum,
        "eps": eps,
        "affine": affine,
        "steps": steps,
        "x": lst(x),
        "running_mean_before": lst(bn.running_mean),
        "running_var_before": lst(bn.running_var),
    }
    if affine:
        case["gamma"] = lst(bn.weight)
        case["beta"] = lst(bn.bias)
    bn.train()
    xs = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    # `steps` forward calls on the same batch: later ones only move the running stats.
    for _ in range(steps - 1):
        with torch.no_grad():
            bn(xs)
    y = bn(xs)
    (y * g).sum().backward()
    case["g"] = lst(g)
    case["y"] = lst(y)
    case["dx"] = lst(xs.grad)
    if affine:
        case["dgamma"] = lst(bn.weight.grad)
        case["dbeta"] = lst(bn.bias.grad)
    case["running_mean_after"] = lst(bn.running_mean)
    case["running_var_after"] = lst(bn.running_var)
    case["num_batches_tracked"] = int(bn.num_batches_tracked)
    bn.eval()
    with torch.no_grad():
        case["y_eval"] = lst(bn(x))
    return case


def d2l_case(name, x, gamma, beta, eps=1e-5, momentum_old=0.9):
    """The d2l chapter's scratch formula: biased variance everywhere, moving_var starts at 1."""
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    mean = x.mean(dim=dims)
    var = ((x - mean.reshape(shape)) ** 2).mean(dim=dims)
    y = gamma.reshape(shape) * (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) + beta.reshape(shape)
    c = x.shape[1]
    mm0, mv0 = torch.zeros(c), torch.ones(c)
    mm = momentum_old * mm0 + (1 - momentum_old) * mean
    mv = momentum_old * mv0 + (1 - momentum_old) * var
    y_eval = gamma.reshape(shape) * (x - mm.reshape(shape)) / torch.sqrt(mv.reshape(shape) + eps) + beta.reshape(shape)
    return {
        "name": name,
        "convention": "d2l_scratch: moving = 0.9*moving + 0.1*batch, biased variance, moving_mean=0 and moving_var=1 at start",
        "shape": list(x.shape), "eps": eps, "x": lst(x), "gamma": lst(gamma), "beta": lst(beta),
        "running_mean_before": lst(mm0), "running_var_before": lst(mv0),
        "y": lst(y), "running_mean_after": lst(mm), "running_var_after": lst(mv), "y_eval": lst(y_eval),
    }


cases = [
    # The chapter's own demonstrations (MXNet notebook): gamma=1, beta=0, normalised output only.
    {"name": "d2l_demo_fc_arange6", "shape": [3, 2], "x": list(map(float, range(6))), "eps": 1e-5,
     "y": lst((lambda a: (a - a.mean(0)) / torch.sqrt(((a - a.mean(0)) ** 2).mean(0) + 1e-5))(torch.arange(6.0).reshape(3, 2)))},
    {"name": "d2l_demo_conv_arange18", "shape": [1, 2, 3, 3], "x": list(map(float, range(18))), "eps": 1e-5,
     "y": lst((lambda b: (b - b.mean((0, 2, 3), keepdim=True)) / torch.sqrt(((b - b.mean((0, 2, 3), keepdim=True)) ** 2).mean((0, 2, 3), keepdim=True) + 1e-5))(torch.arange(18.0).reshape(1, 2, 3, 3)))},
    torch_case("fc_4x3", torch.randn(4, 3) * 2 + 1),
    torch_case("seq_8x5x7", torch.randn(8, 5, 7) * 3 - 2),
    torch_case("conv2d_6x4x5x5", torch.randn(6, 4, 5, 5) * 0.5 + 3),
    torch_case("conv3d_3x2x4x3x3", torch.randn(3, 2, 4, 3, 3) + 0.25),
    torch_case("conv2d_no_affine", torch.randn(5, 3, 4, 4), affine=False),
    torch_case("conv2d_cumulative_momentum_3_steps", torch.randn(4, 3, 3, 3) * 2, momentum=None, steps=3),
    torch_case("fc_eps_1e-3_momentum_0.01", torch.randn(16, 6) * 10, momentum=0.01, eps=1e-3),
    torch_case("conv2d_large_mean", torch.randn(8, 2, 6, 6) * 0.01 + 1000.0),
    d2l_case("d2l_scratch_conv_2x3x4x4", torch.randn(2, 3, 4, 4) * 2 + 1, torch.rand(3) + 0.5, torch.randn(3)),
    d2l_case("d2l_scratch_fc_10x4", torch.randn(10, 4), torch.rand(4) + 0.5, torch.randn(4)),
]

out = {
    "generator": "tools/make_bn_reference.py",
    "torch_version": torch.__version__,
    "dtype": "float64 (compare float32 results with a tolerance of about 1e-4 relative)",
    "layout": "every tensor flattened in row-major (C) order; per-channel tensors have length C = shape[1]",
    "gradient": "dx, dgamma, dbeta are gradients of sum(y * g)",
    "cases": cases,
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "batchnorm_reference.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", os.path.normpath(path), len(cases), "cases")
