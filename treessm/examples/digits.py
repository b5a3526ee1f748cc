"""Handwritten digits with a small GrootV, and pictures of the trees it learns to build.

Trains the same small GrootV twice on scikit-learn's bundled 8x8 digits (1,797 real scans,
no download) -- once with the tree scan, once with the raster scan (a plain bidirectional
selective scan over a row-major chain) -- with identical seed, split and hyper-parameters,
and reports both held-out accuracies as one JSON line on stdout::

    python -m treessm.examples.digits --out digits_out

It runs unchanged under ``torchrun`` (``docs/distributed.md``): every process trains a
replica on its share of each epoch (``DistributedSampler``), rank 0 shows the progress,
evaluates, draws and prints the summary, and every rank prints ``param_checksum <value>``
at the end so that anyone can see the replicas agree::

    torchrun --standalone --nproc_per_node=2 -m treessm.examples.digits --epochs 1 --out DIR

Pictures written to ``--out``:

* ``digit_trees.png`` -- test digits with the spanning trees that the trained first-stage
  TreeSSM layers build from their own features (edges coloured by the learned decay
  ``exp(Δ A)``, averaged over channels: how much of a state passes along the edge);
* ``photo_tree.png`` -- the same trained first layer applied to a real photograph
  (scikit-image's ``camera``, resized to 64x64): its features depend only on a 7x7
  neighbourhood (two 3x3 stem convolutions and the layer's 3x3 depthwise convolution), so
  the layer runs unchanged on any image size; shown are the tree it builds, the depth of
  each pixel in that tree, and the affinity ``S(anchor, v)`` of every pixel to the centre
  pixel, computed with the tree scan itself on a one-hot input.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from treessm import Tree, tree_scan
from treessm._checks import check_int
from treessm.examples.distributed import World, param_checksum, setup
from treessm.models import GrootV

__all__ = ["make_model", "load_digits_split", "train", "evaluate", "layer_tree", "main"]


def make_model(scan: str = "tree", drop_path_rate: float = 0.1) -> GrootV:
    """A two-stage GrootV for 8x8 inputs: the stem keeps the resolution, stage 1 runs on the
    8x8 grid (32 channels), stage 2 on 4x4 (64 channels)."""
    return GrootV(num_classes=10, in_chans=1, dims=(32, 64), depths=(2, 2),
                  stem_strides=(1, 1), downsample_strides=(2,), drop_path_rate=drop_path_rate,
                  scan=scan)


def load_digits_split(seed: int, test_size: float = 0.2, limit: int = 0):
    """Stratified train/test split of the digits as ``[N, 1, 8, 8]`` float tensors scaled to
    ``[0, 1]``, with integer labels. ``limit > 0`` keeps the first ``limit`` images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    if limit:
        x, y = x[:limit], y[:limit]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed,
                                              stratify=y)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return as_t(x_tr)[:, None], as_t(y_tr), as_t(x_te)[:, None], as_t(y_te)


def _normalize(x: Tensor, mean: float, std: float) -> Tensor:
    return (x - mean) / std


def _random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): the digits are
    roughly centred, so this is the augmentation that matters."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    idx = torch.arange(b)[:, None, None].expand(b, h, w)
    return padded[idx, 0, rows, cols][:, None]


def _batches(n: int, batch_size: int, epoch: int, seed: int, generator: torch.Generator,
             world: World):
    """Index batches of one epoch: a random permutation of all ``n`` examples, or this
    process's share of it under ``torchrun`` (``DistributedSampler``, shuffled per epoch)."""
    if not world.distributed:
        perm = torch.randperm(n, generator=generator)
    else:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank,
                                     shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        perm = torch.tensor(list(sampler))
    return [perm[i:i + batch_size] for i in range(0, perm.shape[0], batch_size)]


def train(model: GrootV, x: Tensor, y: Tensor, epochs: int, seed: int, batch_size: int = 64,
          lr: float = 3e-3, weight_decay: float = 0.05, desc: str = "train",
          progress: bool = True, world: World = World()) -> float:
    """AdamW with linear warm-up and cosine decay, label smoothing and random shifts, on
    ``world.device``, in DistributedDataParallel under ``torchrun`` (``batch_size`` per
    process). Returns the wall-clock training time in seconds."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed + world.rank)  # shifts differ per rank
    no_decay = model.no_weight_decay()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay and p.dim() > 1],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in no_decay or p.dim() <= 1],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    net = world.wrap(model)
    steps_per_epoch = len(_batches(x.shape[0], batch_size, 0, seed, torch.Generator(), world))
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    net.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not (progress and world.main), leave=False)
    for epoch in range(epochs):
        for idx in _batches(x.shape[0], batch_size, epoch, seed, generator, world):
            xb = _random_shift(x[idx], generator).to(world.device)
            loss = F.cross_entropy(net(xb), y[idx].to(world.device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if world.main and progress:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: GrootV, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(-1).cpu()
        correct += int((pred == y[i:i + batch_size]).sum())
    return correct / max(1, x.shape[0])


@torch.no_grad()
def layer_tree(model: GrootV, images: Tensor, block: int = 0) -> Tuple[Tree, Tensor]:
    """The tree that block ``block`` of the first stage builds for ``images``, and the
    decay ``exp(Δ A)`` of every vertex's edge to its parent (``[N, d_inner * d_state]``)."""
    model.eval()
    stage = model.stages[0]
    x = stage.downsample(model.stem(images))
    for blk in stage.blocks[:block]:
        x, _ = blk(x)
    mixer = stage.blocks[block].mixer
    u, _ = mixer.project_in(stage.blocks[block].norm1(x))
    tree = mixer.scan_tree(u)
    delta, _, _ = mixer.ssm_inputs(u.reshape(-1, mixer.d_inner))
    decay = torch.exp(F.softplus(delta.float()).unsqueeze(-1) * -torch.exp(mixer.A_log.float()))
    return tree, decay.flatten(1)


def _tree_segments(tree: Tree, height: int, width: int, offset: int = 0):
    parent = tree.parent.cpu().numpy()
    v = np.arange(offset, offset + height * width)
    p = parent[v]
    keep = p >= 0
    v, p = v[keep] - offset, p[keep] - offset
    seg = np.stack([np.stack([v % width, v // width], -1),
                    np.stack([p % width, p // width], -1)], 1).astype(np.float64)
    return seg, keep


def _decay_rate(decay: Tensor) -> np.ndarray:
    """``|ΔA|`` of each vertex's edge, averaged over channels: the state an edge loses is
    ``1 - exp(-|ΔA|)``. Decays sit near 1 (0.999 and 0.99995 look alike on a linear scale);
    their rates differ by orders of magnitude, which a log colour scale shows."""
    return (-torch.log(decay.clamp_min(1e-30))).mean(-1).cpu().numpy()


def _rate_norm(rate: np.ndarray):
    from matplotlib.colors import LogNorm

    positive = rate[rate > 0]
    low = float(np.percentile(positive, 1)) if positive.size else 1e-6
    return LogNorm(vmin=low, vmax=max(float(rate.max()), low * 10))


def _draw_tree(ax, image: np.ndarray, tree: Tree, rate: np.ndarray, norm, offset: int = 0,
               linewidth: float = 2.0):
    from matplotlib.collections import LineCollection

    h, w = image.shape
    ax.imshow(image, cmap="gray", interpolation="nearest")
    seg, keep = _tree_segments(tree, h, w, offset)
    s = np.clip(rate[offset:offset + h * w][keep], norm.vmin, None)
    lines = LineCollection(seg, cmap="autumn_r", linewidths=linewidth, alpha=0.9, norm=norm)
    lines.set_array(s)
    ax.add_collection(lines)
    roots = np.flatnonzero(tree.parent.cpu().numpy()[offset:offset + h * w] < 0)
    ax.plot(roots % w, roots // w, "c*", markersize=8 if h <= 16 else 5)
    ax.set_axis_off()
    return lines


def draw_digit_trees(model: GrootV, images: Tensor, labels: Tensor, mean: float, std: float,
                     path: str):
    """Sample digits with the trees of both first-stage blocks (top: block 1, bottom:
    block 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, depth = images.shape[0], len(model.stages[0].blocks)
    h, w = images.shape[-2:]
    fig, axes = plt.subplots(depth, n, figsize=(1.6 * n + 1.2, 1.8 * depth + 0.7),
                             squeeze=False)
    fig.text(0.5, 0.01, "edge colour: decay rate |ΔA| of the edge (the edge keeps "
             "exp(-|ΔA|) of the state), averaged over channels, log scale",
             ha="center", fontsize=8)
    for b in range(depth):
        tree, decay = layer_tree(model, _normalize(images, mean, std), block=b)
        rate = _decay_rate(decay)
        norm = _rate_norm(rate)
        for i in range(n):
            lines = _draw_tree(axes[b, i], images[i, 0].numpy(), tree, rate, norm,
                               offset=i * h * w)
            if b == 0:
                axes[b, i].set_title(f"label {int(labels[i])}", fontsize=9)
        axes[b, 0].text(-0.2 * w, (h - 1) / 2, f"block {b + 1}", rotation=90, va="center",
                        ha="center", fontsize=9)
        fig.colorbar(lines, ax=axes[b].tolist(), shrink=0.9, label="decay rate |ΔA|")
    fig.suptitle("Trees built by the trained first-stage TreeSSM layers (star: root)",
                 fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw_photo_tree(model: GrootV, mean: float, std: float, path: str, size: int = 64):
    """The trained first TreeSSM layer's tree on a real photograph (see module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage import data
    from skimage.transform import resize

    photo = resize(data.camera().astype(np.float32) / 255.0, (size, size), anti_aliasing=True)
    images = torch.from_numpy(photo.astype(np.float32))[None, None]
    tree, decay = layer_tree(model, _normalize(images, mean, std), block=0)
    rate = _decay_rate(decay)

    # S(anchor, v) for every v: the tree scan of a one-hot input, per channel, averaged
    anchor = (size // 2) * size + size // 2
    onehot = torch.zeros_like(decay)
    onehot[anchor] = 1.0
    affinity = tree_scan(onehot, decay, tree, "both").mean(-1).reshape(size, size)

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    lines = _draw_tree(axes[0], photo, tree, rate, _rate_norm(rate),
                       linewidth=0.8 if size > 32 else 1.2)
    fig.colorbar(lines, ax=axes[0], shrink=0.8,
                 label="decay rate |ΔA| of the edge (log scale)")
    axes[0].set_title("tree of the trained first layer", fontsize=10)
    depth = tree.depth.cpu().numpy().reshape(size, size)
    im = axes[1].imshow(depth, cmap="viridis")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="depth in tree")
    axes[1].set_title("depth (distance from the root, the first pixel)", fontsize=10)
    axes[1].set_axis_off()
    log_aff = np.log10(affinity.clamp_min(1e-30).numpy())
    im = axes[2].imshow(log_aff, cmap="magma", vmin=max(float(np.percentile(log_aff, 1)), -30))
    axes[2].plot(size // 2, size // 2, "c+", markersize=10)
    fig.colorbar(im, ax=axes[2], shrink=0.8, label="log10 S(anchor, v)")
    axes[2].set_title("affinity S(anchor, v) to the centre pixel", fontsize=10)
    axes[2].set_axis_off()
    fig.suptitle(f"scikit-image camera photo at {size}x{size}, seen by a layer trained on "
                 "8x8 digits", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(out: str, epochs: int = 20, seed: int = 0, quick: bool = False, threads: int = 1,
        progress: bool = True, world: World = World()) -> Dict:
    """Train and evaluate both scans, draw the pictures, return the summary (the pictures
    and summary on rank 0 only; other ranks return an empty dict).

    ``threads`` sets the torch and numba thread counts for the run (restored afterwards).
    One thread is the default: the tensors of an 8x8 model are far too small for threads
    to pay, and on a loaded machine spinning thread pools make steps many times slower.
    """
    import numba

    threads = check_int(threads, "threads", 1)
    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return _run(out, epochs, seed, quick, progress, world)
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def _run(out: str, epochs: int, seed: int, quick: bool, progress: bool, world: World) -> Dict:
    if world.main:
        os.makedirs(out, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed, limit=400 if quick else 0)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    xn_tr, xn_te = _normalize(x_tr, mean, std), _normalize(x_te, mean, std)

    summary = {}
    models = {}
    for scan in ("tree", "raster"):
        torch.manual_seed(seed)  # identical initial weights for both scans
        model = make_model(scan).to(world.device)
        seconds = train(model, xn_tr, y_tr, epochs, seed, desc=f"{scan} scan",
                        progress=progress, world=world)
        models[scan] = model
        if not world.main:
            continue
        acc = evaluate(model, xn_te, y_te)
        prefix = "" if scan == "tree" else "raster_"
        summary[prefix + "test_accuracy"] = round(acc, 4)
        summary[prefix + "train_accuracy"] = round(evaluate(model, xn_tr, y_tr), 4)
        summary[prefix + "train_seconds"] = round(seconds, 1)
    summary["param_checksum"] = sum(param_checksum(m) for m in models.values())
    if not world.main:
        return summary

    model = models["tree"].cpu()
    sample = torch.stack([torch.nonzero(y_te == d)[0, 0] for d in range(8)
                          if bool((y_te == d).any())])
    figures = [os.path.join(out, "digit_trees.png"), os.path.join(out, "photo_tree.png")]
    draw_digit_trees(model, x_te[sample], y_te[sample], mean, std, figures[0])
    draw_photo_tree(model, mean, std, figures[1], size=32 if quick else 64)
    summary.update(
        params=sum(p.numel() for p in model.parameters()), epochs=epochs, seed=seed,
        num_train=int(x_tr.shape[0]), num_test=int(x_te.shape[0]),
        threads=torch.get_num_threads(), processes=world.size, figures=figures)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="digits_out", help="folder for the pictures")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs per model (default: 20, or 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and numba threads (default: 1, fastest for this small "
                             "model)")
    parser.add_argument("--quick", action="store_true",
                        help="a few epochs on a subset: checks that everything runs")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="where to train; under torchrun with GPUs: cuda (default: cpu)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 20)
    if epochs < 1:
        parser.error(f"--epochs must be positive, got {epochs}")
    if args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    world = setup(args.device)
    try:
        summary = run(args.out, epochs=epochs, seed=args.seed, quick=args.quick,
                      threads=args.threads, progress=not args.no_progress, world=world)
    finally:
        world.close()
    if world.main:
        print(json.dumps(summary))
    print(f"param_checksum {summary['param_checksum']!r}", flush=True)
    return summary


if __name__ == "__main__":
    main()
