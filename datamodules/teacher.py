"""The neuron-sharing data: N standard-normal points labelled by a random shallow ReLU teacher.

X (N, d) ~ N(0, I); the teacher is ``ShallowReLU(d, teacher_width, D)`` (hidden layer with
bias, output layer without) whose weights are all i.i.d. N(0, 1); Y = teacher(X) (N, D),
plus optional Gaussian noise of standard deviation ``noise``. Everything comes from one
generator seeded by ``seed``, independent of the global seed that initialises the student.
One batch is the whole data set (full-batch training).
"""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from models.shallow_relu import ShallowReLU


class TeacherDataModule(pl.LightningDataModule):
    """Args: n_samples (N = 50 in the paper), in_dim (d = 2), teacher_width (5),
    out_dim (D = 2), seed (of the points and the teacher), noise (0: exact teacher labels)."""

    def __init__(
        self,
        n_samples: int = 50,
        in_dim: int = 2,
        teacher_width: int = 5,
        out_dim: int = 2,
        seed: int = 0,
        noise: float = 0.0,
    ) -> None:
        super().__init__()
        if min(n_samples, in_dim, teacher_width, out_dim) < 1 or noise < 0:
            raise ValueError("n_samples, in_dim, teacher_width, out_dim must be >= 1 and noise >= 0")
        self.save_hyperparameters()
        self.teacher: Optional[ShallowReLU] = None
        self.X: Optional[torch.Tensor] = None
        self.Y: Optional[torch.Tensor] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.X is not None:
            return
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed)
        self.X = torch.randn(hp.n_samples, hp.in_dim, generator=g)
        teacher = ShallowReLU(hp.in_dim, hp.teacher_width, hp.out_dim)
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            Y = teacher(self.X)
            if hp.noise > 0:
                Y = Y + hp.noise * torch.randn(Y.shape, generator=g)
        self.teacher, self.Y = teacher.requires_grad_(False), Y

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.X, self.Y), batch_size=self.hparams.n_samples, shuffle=False)
