"""Train the 8x8 digits feature extractor that stands in for Inception offline.

Trains ``cm.metrics.digits.DigitsNet`` on the fixed training split of scikit-learn's digits
(``cm.metrics.digits.digits_split``: 1437 images; 360 held out), with random shifts of up to one
pixel, prints the held-out accuracy and writes the weights atomically as safetensors.

    python scripts/train_digits_features.py [--out cm/metrics/digits_features.safetensors]
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from cm.files import atomic_path
from cm.metrics.digits import DEFAULT_PATH, DigitsNet, digits_split, load_digits_uint8, preprocess


def shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift] per axis.

    Args:
        x: float images ``[N, 1, H, W]`` in [-1, 1].
        generator: source of the offsets, for reproducible runs.
        max_shift: largest offset in pixels.
    """
    n, _, h, w = x.shape
    # Pad with -1 (the digits' blank background) so shifted-in borders look like real margins.
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [N, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [N, 1, W]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(epochs: int, seed: int, batch_size: int = 64) -> tuple[DigitsNet, float]:
    """Train the classifier; return it (eval mode) and its held-out accuracy.

    Args:
        epochs: passes over the training split.
        seed: seeds initialisation, batch order and augmentation.
        batch_size: images per step.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_uint8()
    train_idx, test_idx = digits_split()
    x = preprocess(images)  # the module's own preprocessing, so train and eval inputs agree
    x_train, y_train = x[train_idx], labels[train_idx]
    x_test, y_test = x[test_idx], labels[test_idx]

    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            loss = F.cross_entropy(net(shift(x_train[b], generator)), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x_test).argmax(1) == y_test).float().mean().item()
    return net, acc


def main() -> None:
    """Train, report held-out accuracy and write the weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="safetensors output path")
    parser.add_argument("--epochs", type=int, default=40, help="passes over the training split")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    args = parser.parse_args()

    # Tiny tensors: one intra-op thread is ~10x faster than two contending ones on small CPUs.
    torch.set_num_threads(1)
    start = time.perf_counter()
    net, acc = train(args.epochs, args.seed)
    params = sum(p.numel() for p in net.parameters())
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    metadata = {"held_out_accuracy": f"{acc:.4f}", "seed": str(args.seed)}
    with atomic_path(args.out) as tmp:  # complete or absent, with the umask's modes
        save_file(state, str(tmp), metadata=metadata)
    print(
        f"held-out accuracy {acc:.4f} ({len(digits_split()[1])} images), {params} parameters, "
        f"{time.perf_counter() - start:.1f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
