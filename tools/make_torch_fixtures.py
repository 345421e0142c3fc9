#!/usr/bin/env python3
"""Write the PyTorch state_dict fixtures of tests/torch_files.rs, and the logits PyTorch computes
with them.

    python3 tools/make_torch_fixtures.py [--out tests/fixtures/torch] [--data-dir DIR]

d2l's LeNet-BN (the chapter's concise nn.Sequential, tools/torch_crosscheck.py's definition) is
trained for 20 SGD steps (lr 1.0, batch 64) on the first Fashion-MNIST training images, so that
its weights and running statistics are not the defaults, and saved four ways:

- lenet_bn.pt: torch.save(net.state_dict(), PATH), PyTorch's zip format;
- lenet_bn_legacy.pt: the same with _use_new_zipfile_serialization=False (PyTorch before 1.6);
- lenet_bn_module.pt: torch.save(net), the whole pickled module;
- lenet_bn.safetensors: safetensors.torch.save_file(net.state_dict(), PATH).

lenet_bn_logits.json holds PyTorch's eval-mode float32 logits of the first 64 test images, with
the torch version. Needs torch and numpy; not a test dependency (the outputs are committed).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_crosscheck import DATA_DIR, build, find, read_idx, write_safetensors  # noqa: E402

TEST_IMAGES = 64


def images(data_dir, split, n):
    x = read_idx(find(data_dir, f"{split}-images-idx3-ubyte"))[:n]
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)


def labels(data_dir, split, n):
    return torch.from_numpy(read_idx(find(data_dir, f"{split}-labels-idx1-ubyte"))[:n].astype(np.int64))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/torch")
    ap.add_argument("--data-dir", default=DATA_DIR)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = build("lenet-bn")
    x, y = images(args.data_dir, "train", 20 * 64), labels(args.data_dir, "train", 20 * 64)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    net.train()
    for i in range(20):
        opt.zero_grad()
        F.cross_entropy(net(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64]).backward()
        opt.step()
    net.eval()
    state = net.state_dict()
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    torch.save(state, out("lenet_bn.pt"))
    torch.save(state, out("lenet_bn_legacy.pt"), _use_new_zipfile_serialization=False)
    torch.save(net, out("lenet_bn_module.pt"))
    write_safetensors(state, out("lenet_bn.safetensors"))
    with torch.no_grad():
        logits = net(images(args.data_dir, "t10k", TEST_IMAGES))
    record = {
        "torch_version": torch.__version__,
        "test_images": TEST_IMAGES,
        "logits": [[float(v) for v in row] for row in logits.numpy().astype(np.float32)],
    }
    with open(out("lenet_bn_logits.json"), "w") as f:
        json.dump(record, f)
        f.write("\n")
    print(f"{args.out}: LeNet-BN after 20 steps, {len(state)} keys; logits of "
          f"{TEST_IMAGES} test images", file=sys.stderr)


if __name__ == "__main__":
    main()
