"""The inputs and outputs of one Linear layer over a data set, as dense matrices, for the
benchmarks: scikit-learn and skglm need the (N, K) feature matrix that the project itself
never builds (it streams the statistics instead). Cached under ``.cache/features``."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datamodules.fashion_mnist import FashionMNISTDataModule
from models.checkpoints import load_network
from models.layers import resolve_layer_name

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "features"


@torch.no_grad()
def capture(network: nn.Module, layer: str, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """X (N, K) float32 inputs and Y (N, D) float32 outputs of ``network``'s Linear ``layer``."""
    xs, ys = [], []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        xs.append(inputs[0].detach().clone())  # clone: the next in-place ReLU would overwrite it
        ys.append(output.detach().clone())

    handle = network.get_submodule(layer).register_forward_hook(hook)
    try:
        for images, _ in tqdm(loader, desc=f"features of {layer}", leave=False):
            network(images)
    finally:
        handle.remove()
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def fashion_features(checkpoint: str, layer: str = "last", root: str = "data",
                     batch_size: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, b) of ``layer`` of the network in ``checkpoint`` over the whole Fashion-MNIST
    training set (60,000 images, eval transforms); b is the layer's bias."""
    network = load_network(checkpoint).eval()
    path = resolve_layer_name(network, layer, "alexnet")
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    cached = CACHE / f"fashion-{digest}-{path}.npz"
    if cached.is_file():
        saved = np.load(cached)
        return saved["X"], saved["Y"], saved["b"]
    dm = FashionMNISTDataModule(root=root, batch_size=batch_size, num_workers=2, val_fraction=0.0)
    dm.prepare_data()
    dm.setup("fit")
    X, Y = capture(network, path, dm.train_eval_dataloader())
    b = network.get_submodule(path).bias.detach().numpy()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cached, X=X, Y=Y, b=b)
    return X, Y, b
