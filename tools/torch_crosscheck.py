#!/usr/bin/env python3
"""Cross-check a bnlab model against PyTorch on the Fashion-MNIST test set.

Given a state_dict that bnlab exported as safetensors and the logits bnlab computed, this
builds the same network in PyTorch, loads the file with load_state_dict(strict=True), runs it
in eval mode on the same test images and reports how many predicted classes differ and the
largest |logit difference|.

    bnlab export RUN_DIR --out OUT.safetensors
    bnlab eval --weights OUT.safetensors --no-fold --logits OUT.logits.npy
    python tools/torch_crosscheck.py OUT.safetensors --logits OUT.logits.npy
    python tools/torch_crosscheck.py --dump-keys > tests/fixtures/torch_state_dict_keys.json
    python tools/torch_crosscheck.py --dump-keys --layout notebook \
        > tests/fixtures/torch_state_dict_keys_notebook.json

bnlab export --layout notebook writes the keys of the chapter notebooks' own ResNet-18 and
DenseNet (named children); the file's metadata says so and the check builds that definition.

The other direction, a file PyTorch wrote read by bnlab:

    python tools/torch_crosscheck.py --make-torch-file resnet18 FROM_TORCH.safetensors
    bnlab eval --weights FROM_TORCH.safetensors --model resnet18 --no-fold --logits LOGITS.npy
    python tools/torch_crosscheck.py FROM_TORCH.safetensors --model resnet18 --logits LOGITS.npy

Training from the same weights, in file order (epoch 1's loss, PyTorch against bnlab):

    python tools/torch_crosscheck.py INIT.safetensors --train-epoch [--float64]
    bnlab train --init INIT.safetensors --no-shuffle --epochs 1 --json

--make-torch-file saves a freshly initialised PyTorch model whose BN layers have seen a few
training batches (so their running statistics and num_batches_tracked are not the defaults).

The model kind, BN eps, pooling, activation and image size come from the file's metadata
(bnlab writes them); flags override them. Exit status 1 if the largest logit difference
exceeds --max-logit-diff. Needs torch and numpy; uses the `safetensors` package if installed,
else reads the (simple) format itself. Not a test dependency.

The networks are those of shared/bench/torch_bench.py (d2l's definitions), extended with
the options bnlab has: BN left out (--norm none), max pooling and ReLU for LeNet.
"""
import argparse
import gzip
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATA_DIR = "/usr/share/datasets/fashion-mnist"
KINDS = ["lenet", "lenet-bn", "lenet-gluon", "resnet18", "densenet", "speednet", "speednet-wide",
         "speednet-deep"]


# ----------------------------------------------------------------------------- models
def keep(*layers):
    """nn.Sequential of the layers that exist: a left-out BN shifts the indices after it,
    as in d2l's plain LeNet."""
    return nn.Sequential(*[l for l in layers if l is not None])


def lenet(bn, eps=1e-5, pool="avg", activation="sigmoid"):
    b2 = (lambda c: nn.BatchNorm2d(c, eps=eps)) if bn else (lambda c: None)
    b1 = (lambda c: nn.BatchNorm1d(c, eps=eps)) if bn else (lambda c: None)
    act = nn.Sigmoid if activation == "sigmoid" else nn.ReLU
    pool2 = (lambda: nn.AvgPool2d(2, 2)) if pool == "avg" else (lambda: nn.MaxPool2d(2, 2))
    return keep(nn.Conv2d(1, 6, kernel_size=5), b2(6), act(), pool2(),
                nn.Conv2d(6, 16, kernel_size=5), b2(16), act(), pool2(), nn.Flatten(),
                nn.Linear(16 * 4 * 4, 120), b1(120), act(),
                nn.Linear(120, 84), b1(84), act(),
                nn.Linear(84, 10))


# bnlab's src/models/speednet.rs: (in, out, max pool after) of each 3x3 conv block.
SPEEDNET_BLOCKS = {
    "speednet": [(1, 24, True), (24, 48, False), (48, 48, True), (48, 96, True)],
    "speednet-wide": [(1, 32, True), (32, 64, False), (64, 64, True), (64, 128, True)],
    "speednet-deep": [(1, 32, True), (32, 64, False), (64, 64, True), (64, 128, False),
                      (128, 128, True)],
}


def speednet(bn, eps=1e-5, kind="speednet"):
    """bnlab's speedrun network: Conv 3x3 (pad 1) -> BN -> ReLU (-> MaxPool 2) per block, then
    Flatten -> Linear, one nn.Sequential."""
    layers, blocks = [], SPEEDNET_BLOCKS[kind]
    for cin, cout, pooled in blocks:
        layers += [nn.Conv2d(cin, cout, 3, padding=1),
                   nn.BatchNorm2d(cout, eps=eps) if bn else None, nn.ReLU()]
        if pooled:
            layers.append(nn.MaxPool2d(2, 2))
    side = 28
    for _, _, pooled in blocks:
        side = side // 2 if pooled else side
    layers += [nn.Flatten(), nn.Linear(blocks[-1][1] * side * side, 10)]
    return keep(*layers)


def lenet_gluon(bn, eps=1e-5):
    """The MXNet notebook's LeNet (Conv 20@5 → BN → ReLU → MaxPool → Conv 50@3 → BN → ReLU →
    MaxPool → Dense 128 + ReLU → Dense 10) as the PyTorch Sequential of the same layers."""
    b2 = (lambda c: nn.BatchNorm2d(c, eps=eps)) if bn else (lambda c: None)
    return keep(nn.Conv2d(1, 20, kernel_size=5), b2(20), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(20, 50, kernel_size=3), b2(50), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Flatten(), nn.Linear(1250, 128), nn.ReLU(), nn.Linear(128, 10))


class Residual(nn.Module):
    def __init__(self, cin, cout, use_1x1conv=False, strides=1, bn=True, eps=1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(cin, cout, kernel_size=1, stride=strides) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(cout, eps=eps) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(cout, eps=eps) if bn else nn.Identity()

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3 is not None:
            X = self.conv3(X)
        return F.relu(Y + X)


def stem(bn, eps):
    return keep(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
                nn.BatchNorm2d(64, eps=eps) if bn else None, nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


def resnet18(bn=True, eps=1e-5):
    def block(cin, cout, first_block=False):
        return nn.Sequential(
            Residual(cin, cout, use_1x1conv=not first_block, strides=1 if first_block else 2,
                     bn=bn, eps=eps),
            Residual(cout, cout, bn=bn, eps=eps))

    return nn.Sequential(stem(bn, eps), block(64, 64, first_block=True), block(64, 128),
                         block(128, 256), block(256, 512),
                         nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 10))


class DenseBlock(nn.Module):
    def __init__(self, num_convs, cin, growth, bn, eps):
        super().__init__()
        self.net = nn.Sequential(*[
            keep(nn.BatchNorm2d(cin + i * growth, eps=eps) if bn else None, nn.ReLU(),
                 nn.Conv2d(cin + i * growth, growth, kernel_size=3, padding=1))
            for i in range(num_convs)])

    def forward(self, X):
        for blk in self.net:
            X = torch.cat((X, blk(X)), dim=1)
        return X


def densenet(bn=True, eps=1e-5):
    c, growth, layers = 64, 32, [4, 4, 4, 4]
    blocks = []
    for i, n in enumerate(layers):
        blocks.append(DenseBlock(n, c, growth, bn, eps))
        c += n * growth
        if i != len(layers) - 1:
            blocks.append(keep(nn.BatchNorm2d(c, eps=eps) if bn else None, nn.ReLU(),
                               nn.Conv2d(c, c // 2, kernel_size=1), nn.AvgPool2d(2, 2)))
            c //= 2
    return keep(stem(bn, eps), *blocks, nn.BatchNorm2d(c, eps=eps) if bn else None, nn.ReLU(),
                nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(c, 10))


# The chapter notebooks' own ResNet-18 and DenseNet (Dive-into-DL-PyTorch): the same layers,
# with named children added to a top-level Sequential, so other state_dict keys.
def resnet18_notebook(bn=True, eps=1e-5):
    net = keep(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
               nn.BatchNorm2d(64, eps=eps) if bn else None, nn.ReLU(),
               nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    channels = [(64, 64, True), (64, 128, False), (128, 256, False), (256, 512, False)]
    for s, (cin, cout, first) in enumerate(channels, start=1):
        net.add_module(f"resnet_block{s}", nn.Sequential(
            Residual(cin, cout, use_1x1conv=not first, strides=1 if first else 2, bn=bn, eps=eps),
            Residual(cout, cout, bn=bn, eps=eps)))
    net.add_module("global_avg_pool", nn.AdaptiveAvgPool2d((1, 1)))
    net.add_module("fc", nn.Sequential(nn.Flatten(), nn.Linear(512, 10)))
    return net


def densenet_notebook(bn=True, eps=1e-5):
    net = keep(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
               nn.BatchNorm2d(64, eps=eps) if bn else None, nn.ReLU(),
               nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    c, growth, layers = 64, 32, [4, 4, 4, 4]
    for i, n in enumerate(layers):
        net.add_module(f"DenseBlosk_{i}", DenseBlock(n, c, growth, bn, eps))  # the notebook's spelling
        c += n * growth
        if i != len(layers) - 1:
            net.add_module(f"transition_block_{i}",
                           keep(nn.BatchNorm2d(c, eps=eps) if bn else None, nn.ReLU(),
                                nn.Conv2d(c, c // 2, kernel_size=1), nn.AvgPool2d(2, 2)))
            c //= 2
    if bn:
        net.add_module("BN", nn.BatchNorm2d(c, eps=eps))
    net.add_module("relu", nn.ReLU())
    net.add_module("global_avg_pool", nn.AdaptiveAvgPool2d((1, 1)))
    net.add_module("fc", nn.Sequential(nn.Flatten(), nn.Linear(c, 10)))
    return net


def build(kind, bn=True, eps=1e-5, pool="avg", activation="sigmoid", layout="d2l"):
    if layout == "notebook" and kind == "resnet18":
        return resnet18_notebook(bn, eps)
    if layout == "notebook" and kind == "densenet":
        return densenet_notebook(bn, eps)
    if kind == "lenet":
        return lenet(False, eps, pool, activation)
    if kind == "lenet-bn":
        return lenet(bn, eps, pool, activation)
    if kind == "lenet-gluon":
        return lenet_gluon(bn, eps)
    if kind.startswith("speednet"):
        return speednet(bn, eps, kind)
    if kind == "resnet18":
        return resnet18(bn, eps)
    if kind == "densenet":
        return densenet(bn, eps)
    raise SystemExit(f"torch_crosscheck: --model {kind!r} is not one of {', '.join(KINDS)}")


# ----------------------------------------------------------------------------- files
DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
          "F16": np.float16}


def read_safetensors(path):
    """(state_dict of torch tensors, metadata dict)."""
    try:
        from safetensors import safe_open
    except ImportError:
        safe_open = None
    if safe_open is not None:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    state = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        state[key] = torch.from_numpy(arr.copy())
    return state, meta


def write_safetensors(state, path):
    """Saves a state_dict as PyTorch users do: safetensors.torch.save_file, or by hand (the same
    format) when the package is missing."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(state, path)
        return
    names = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
    header, chunks, offset = {}, [], 0
    for key, t in state.items():
        data = t.detach().contiguous().numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        buf = f.read()
    ndim = buf[3]
    dims = [int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(data_dir, name):
    for candidate in (name + ".gz", name):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise SystemExit(f"torch_crosscheck: {os.path.join(data_dir, name)}.gz: not found "
                     "(install dataset-fashion-mnist or pass --data-dir)")


# ----------------------------------------------------------------------------- commands
def dump_keys(layout="d2l"):
    """Every model's state_dict keys, shapes and dtypes as PyTorch makes them, one key a line;
    `KIND/none` is the model built without batch norm (`--norm none`). With layout
    "notebook", the two models whose notebook definitions name their children."""
    kinds = KINDS if layout == "d2l" else ["resnet18", "densenet"]
    variants = [(kind, kind, True) for kind in kinds]
    variants += [(f"{kind}/none", kind, False) for kind in kinds if kind != "lenet"]
    lines = []
    for name, kind, bn in variants:
        sd = build(kind, bn=bn, layout=layout).state_dict()
        entries = ",\n".join("    " + json.dumps([k, list(v.shape), str(v.dtype).replace("torch.", "")])
                             for k, v in sd.items())
        lines.append(f'  {json.dumps(name)}: [\n{entries}\n  ]')
    print('{"torch_version": %s, "models": {\n%s\n}}' % (json.dumps(torch.__version__),
                                                        ",\n".join(lines)))


def make_torch_file(kind, path, data_dir, seed=0):
    """A PyTorch model of `kind` after a few training-mode passes over real images, saved."""
    torch.manual_seed(seed)
    net = build(kind)
    size = 32 if kind == "densenet" else 28
    images = read_idx(find(data_dir, "train-images-idx3-ubyte"))[:64]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    net.train()
    with torch.no_grad():
        for i in range(0, 64, 16):
            net(x[i:i + 16])
    write_safetensors(net.state_dict(), path)
    print(f"{path}: PyTorch {kind} state_dict, {len(net.state_dict())} keys, "
          f"images {size}x{size}", file=sys.stderr)


@torch.no_grad()
def crosscheck(args):
    state, raw_meta = read_safetensors(args.state)
    meta = json.loads(raw_meta.get("bnlab", "{}"))
    kind = args.model or meta.get("model")
    if kind is None:
        raise SystemExit(f"torch_crosscheck: {args.state}: no bnlab model in its metadata; "
                         "pass --model")
    norm = args.norm or meta.get("norm", "scratch")
    eps = float(meta.get("bn_eps", "1e-5"))
    size = args.size or int(meta.get("image_size", "28"))
    layout = args.layout or meta.get("layout", "d2l")
    net = build(kind, bn=norm != "none", eps=eps, pool=meta.get("pool", "avg"),
                activation=meta.get("activation", "sigmoid"), layout=layout)
    net.load_state_dict(state, strict=True)
    net.eval()

    theirs = np.load(args.logits)
    if theirs.ndim != 2 or theirs.shape[1] != 10:
        raise SystemExit(f"torch_crosscheck: {args.logits}: shape {theirs.shape}, expected (n, 10)")
    n = theirs.shape[0]
    images = read_idx(find(args.data_dir, "t10k-images-idx3-ubyte"))[:n]
    labels = read_idx(find(args.data_dir, "t10k-labels-idx1-ubyte"))[:n].astype(np.int64)
    if len(images) < n:
        raise SystemExit(f"torch_crosscheck: {args.logits}: {n} rows, but the test set has "
                         f"{len(images)} images")

    ours = []
    bs = args.batch_size or 500
    for i in range(0, n, bs):
        x = torch.from_numpy(images[i:i + bs].astype(np.float32) / 255.0).unsqueeze(1)
        if size != 28:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        ours.append(net(x).numpy())
    ours = np.concatenate(ours)

    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    pred_torch, pred_bnlab = ours.argmax(1), theirs.argmax(1)
    differ = np.nonzero(pred_torch != pred_bnlab)[0]
    scale = float(np.abs(ours).max())
    report = {
        "model": kind, "norm": norm, "layout": layout, "image_size": size, "images": int(n),
        "predictions_differ": int(len(differ)),
        "max_abs_logit_diff": float(diff.max()),
        "max_abs_logit": scale,
        "mean_abs_logit_diff": float(diff.mean()),
        "torch_accuracy": float((pred_torch == labels).mean()),
        "bnlab_accuracy": float((pred_bnlab == labels).mean()),
        "torch_version": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    for i in differ[:10]:
        top = np.sort(ours[i])[-2:]
        print(f"  image {i}: torch {pred_torch[i]}, bnlab {pred_bnlab[i]} "
              f"(torch's top two logits differ by {top[1] - top[0]:.2e})", file=sys.stderr)
    if report["max_abs_logit_diff"] > args.max_logit_diff:
        print(f"torch_crosscheck: max |logit difference| {report['max_abs_logit_diff']:.3e} "
              f"exceeds --max-logit-diff {args.max_logit_diff:g}", file=sys.stderr)
        return 1
    return 0


def train_epoch(args):
    """One epoch of SGD (or Adam) from the weights in STATE, in file order (bnlab's
    --no-shuffle), and the epoch's mean training loss: what `bnlab train --init STATE
    --no-shuffle --epochs 1` (with the same --optimizer, --lr, --batch-size, --resize and
    --limit-batches) must reproduce. Each step's loss is printed too."""
    state, raw_meta = read_safetensors(args.state)
    meta = json.loads(raw_meta.get("bnlab", "{}"))
    kind = args.model or meta.get("model", "lenet-bn")
    norm = args.norm or meta.get("norm", "scratch")
    net = build(kind, bn=norm != "none", eps=float(meta.get("bn_eps", "1e-5")),
                pool=meta.get("pool", "avg"), activation=meta.get("activation", "sigmoid"))
    net.load_state_dict(state, strict=True)
    dtype = torch.float64 if args.float64 else torch.float32
    net = net.to(dtype)
    net.train()
    if args.optimizer == "adam":
        # bnlab's Adam: PyTorch's defaults (betas 0.9, 0.999; eps 1e-8).
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    images = read_idx(find(args.data_dir, "train-images-idx3-ubyte"))
    labels = read_idx(find(args.data_dir, "train-labels-idx1-ubyte")).astype(np.int64)
    bs = args.batch_size or 256  # bnlab train's default
    n = len(images) if args.limit_batches is None else min(len(images), args.limit_batches * bs)
    size = args.size or int(meta.get("image_size", "28"))
    total, seen, steps = 0.0, 0, []
    for i in range(0, n, bs):
        x = torch.from_numpy(images[i:i + bs].astype(np.float32) / 255.0).unsqueeze(1)
        if size != 28:
            # bnlab's resize: bilinear with half-pixel centres, in float32.
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.to(dtype)
        y = torch.from_numpy(labels[i:i + bs])
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(y)
        seen += len(y)
        steps.append(loss.item())
    if args.save_trained:
        write_safetensors(net.float().state_dict(), args.save_trained)
    print(json.dumps({"model": kind, "norm": norm, "optimizer": args.optimizer, "lr": args.lr,
                      "batch_size": bs, "size": size, "step_losses": steps,
                      "dtype": str(dtype).replace("torch.", ""),
                      "examples": seen, "train_loss": total / seen,
                      "torch_version": torch.__version__}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state", nargs="?", help="the safetensors file bnlab exported")
    ap.add_argument("--logits", help="bnlab's test-set logits, an (n, 10) float32 .npy")
    ap.add_argument("--model", choices=KINDS, help="default: the model in the file's bnlab metadata")
    ap.add_argument("--norm", choices=["scratch", "burn", "none"],
                    help="default: the norm in the file's bnlab metadata")
    ap.add_argument("--size", type=int, help="image side; default: image_size in the bnlab metadata, or 28")
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--batch-size", type=int,
                    help="default: 500 for evaluation, 256 (bnlab train's) with --train-epoch")
    ap.add_argument("--max-logit-diff", type=float, default=1e-3,
                    help="fail above this largest |logit difference| (default 1e-3)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--dump-keys", action="store_true",
                    help="print every model's state_dict keys and shapes as JSON, and exit")
    ap.add_argument("--layout", choices=["d2l", "notebook"],
                    help="the PyTorch definition: d2l's nn.Sequential, or the chapter notebooks' "
                         "named children (resnet18, densenet); default: the file's bnlab "
                         "metadata, or d2l")
    ap.add_argument("--train-epoch", action="store_true",
                    help="train one epoch (SGD or Adam) in file order from STATE and print its train loss")
    ap.add_argument("--lr", type=float, default=1.0, help="with --train-epoch (default 1.0)")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                    help="with --train-epoch (default sgd)")
    ap.add_argument("--limit-batches", type=int, help="with --train-epoch: only the first N batches")
    ap.add_argument("--float64", action="store_true",
                    help="with --train-epoch: train in float64, as a reference for float32 runs")
    ap.add_argument("--save-trained", metavar="FILE",
                    help="with --train-epoch: save the trained state_dict (to compare with bnlab's)")
    ap.add_argument("--make-torch-file", metavar="KIND", choices=KINDS,
                    help="save a PyTorch KIND's state_dict to STATE (for bnlab to read), and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dump_keys:
        dump_keys(args.layout or "d2l")
        return 0
    if args.make_torch_file:
        if not args.state:
            ap.error("--make-torch-file needs the path to write")
        make_torch_file(args.make_torch_file, args.state, args.data_dir)
        return 0
    if args.train_epoch:
        if not args.state:
            ap.error("--train-epoch needs the initial weights")
        return train_epoch(args)
    if not args.state or not args.logits:
        ap.error("give the exported file and --logits (or --dump-keys)")
    return crosscheck(args)


if __name__ == "__main__":
    sys.exit(main())
