"""Training overhead of the Classifier LightningModule against a plain PyTorch loop.

Same model (AlexNet, 64x64), same optimizer, same DataLoader over real Fashion-MNIST,
same number of steps; the two are run alternately (plain, Lightning, plain, Lightning, ...)
in one process and the best round of each is compared, so drift on a shared machine
affects both alike. Lightning runs as train.py would: TensorBoard logging, torchmetrics
accuracy, checkpointing off (it happens once per epoch, not per step).

    python -m benchmarks.train_overhead [--steps 30] [--rounds 2] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer

from datamodules.fashion_mnist import FashionMNISTDataModule
from lightning_modules.classifier import Classifier
from models import build_model


def plain_loop(loader, steps: int, lr: float, weight_decay: float) -> float:
    torch.manual_seed(0)
    model = build_model("alexnet", 10).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    images_seen, it = 0, iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        images, labels = next(it)
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images_seen += len(labels)
    return images_seen / (time.perf_counter() - start)


def lightning_loop(dm, steps: int, lr: float, weight_decay: float, log_dir: str) -> float:
    torch.manual_seed(0)
    module = Classifier("alexnet", 10, optimizer="adam", lr=lr, weight_decay=weight_decay)
    timer = Timer()  # from the start to the end of training, like the plain loop's clock
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        logger=pl.loggers.TensorBoardLogger(log_dir, name="overhead"), log_every_n_steps=10,
    )
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return steps * dm.hparams.batch_size / timer.time_elapsed("train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--root", default="data")
    args = parser.parse_args()
    dm = FashionMNISTDataModule(root=args.root, batch_size=args.batch_size, num_workers=2,
                                train_subset=args.batch_size * (args.steps + 1))
    dm.prepare_data()
    dm.setup("fit")
    plain, light = [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for r in range(args.rounds):
            plain.append(plain_loop(dm.train_dataloader(), args.steps, 3e-4, 1e-4))
            light.append(lightning_loop(dm, args.steps, 3e-4, 1e-4, log_dir))
            print(f"round {r + 1}: plain {plain[-1]:7.1f} img/s   Lightning {light[-1]:7.1f} img/s", flush=True)
    best_plain, best_light = max(plain), max(light)
    print(f"\nAlexNet 64x64, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"plain PyTorch loop : {best_plain:7.1f} images/s")
    print(f"Classifier (Lightning): {best_light:7.1f} images/s")
    print(f"Lightning / plain  : {best_light / best_plain:.3f}  (overhead {100 * (1 - best_light / best_plain):+.1f}%)")


if __name__ == "__main__":
    from cli.setup import configure_process

    configure_process()
    main()
