"""Train a pool of networks on a dataset and store them as the ``teachers`` collection that ``fetcher=pretrained``
reads (DD's adaptation and poisoning modes), in the format ``ddrun teacher`` writes.

A stand-in for ``ddrun teacher`` where that command is not available: the same store API
(:class:`ddrun.store.Collection`, :func:`ddrun.store.teacher_payload`), the same setting key (dataset, net,
augmentation), so ``ddrun distill ... fetcher=pretrained`` finds the pool. Recipe: SGD lr 0.01, momentum 0.9,
weight decay 5e-4, batch 256, no augmentation (use ``fetcher.augment=null`` in the distill command), network i
initialized from seed ``1000 + i``; already stored networks are skipped.

    python scripts/pretrained_pool.py --n 8 --epochs 3 dataset=fashion_mnist net=lenet paths.buffers=buffers
"""

from __future__ import annotations

import argparse
import sys

import torch
from hydra import compose, initialize_config_module


def main(argv: list[str]) -> None:
    from ddrun.nets import build_net
    from ddrun.store import Collection, setting_of, teacher_payload
    from ddrun.train import accuracy, train_epoch
    from ddrun.utils import build, derive_seed, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="networks in the pool")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of each")
    ap.add_argument("overrides", nargs="*", help="ddrun distill overrides: dataset=..., net=..., paths.buffers=...")
    args = ap.parse_args(argv)
    with initialize_config_module("ddrun.conf", version_base="1.3"):
        cfg = compose("distill", overrides=["logger=none", *args.overrides])
    device = resolve_device(cfg.device)
    real = build(cfg.dataset).to(device)
    net_factory = build(cfg.net)
    store = Collection(cfg.paths.buffers, "teachers", setting_of(real, net_factory, None))
    training = {"epochs": args.epochs, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch": 256,
                "augment": "none", "seed": 1000}
    store.open_for_writing(training, "python scripts/pretrained_pool.py " + " ".join(argv))
    for i in range(args.n):
        if store.is_done(i):
            continue
        net = build_net(net_factory, real, 1000 + i, device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for e in range(args.epochs):
            train_epoch(net, real.train_images, real.train_labels, opt, 256, None,
                        torch.Generator().manual_seed(derive_seed(1000, i, e)))
        acc = 100.0 * accuracy(net, real.test_images, real.test_labels)
        store.put(i, teacher_payload(net, i, args.epochs, acc, store.setting, training), {"test_acc": round(acc, 2)})
        print(f"network {i}: test accuracy {acc:.2f}%")
    print(f"pool {store.dir}: {len(store.entries())} networks")


if __name__ == "__main__":
    main(sys.argv[1:])
