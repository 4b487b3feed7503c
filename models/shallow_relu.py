"""A shallow ReLU network x -> V relu(W x + b), its full-batch MSE gradient in closed form,
the proximal weight-decay step, and the neuron statistics of the neuron-sharing figure.

Notation (one hidden layer of K neurons, inputs in R^d, outputs in R^D):
    W (K, d), b (K,): hidden layer with bias; u_k = (w_k, b_k) in R^(d+1) is neuron k's
    input vector. V (D, K): output layer without bias; v_k = V[:, k] is neuron k's output
    vector, V[j, k] its weight for output j.

Weight decay and the proximal step. Because relu is positively homogeneous, the network
is unchanged by u_k -> u_k / s, v_k -> s v_k (s > 0), and minimising the weight-decay
penalty (lambda / 2) sum_k (||u_k||^2 + ||v_k||^2) over these rescalings leaves
lambda sum_k ||u_k|| ||v_k||. So training with weight decay lambda has the same solutions
(as functions) as

    minimise  L(W, b, V) + lambda * sum_k ||v_k||_2   subject to  ||u_k||_2 = 1 for all k,

whose non-smooth part h = lambda sum_k ||v_k|| + indicator{||u_k|| = 1} is separable
between the two blocks of variables. A proximal-gradient step is therefore
    theta <- prox_{lr h}(theta - lr grad L(theta)),
and the prox of a separable function acts block by block: the group soft-threshold of
each v_k with threshold lr * lambda (``grouplasso.prox``) and the projection
u_k <- u_k / ||u_k|| onto the unit sphere. The two touch disjoint variables, so their order
does not matter, and the projection deliberately does *not* compensate v_k by ||u_k||.
The compensating rescale (u_k / s, s v_k) keeps the function, but it is not a proximal
step: after a gradient step, which lengthens u_k (at a stationary point
<grad_u L, u_k> = -lambda ||v_k||), it multiplies v_k by about 1 + lr lambda ||v_k||, so
its fixed points are not the stationary points of the problem above, and placed after
the threshold it would also turn the threshold into lr lambda ||u_k||. On the paper's
setting (lr 0.2, lambda 5e-5) "rescale, then threshold" overflowed to NaN within 6e4
iterations, while the projection converges. At the start of training the
input vectors are put on the sphere *with* compensation, which changes nothing but the
parametrisation of the initial network.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from grouplasso.prox import group_norms, group_soft_threshold


class ShallowReLU(nn.Module):
    """x (B, d) -> relu(x W^T + b) V^T (B, D): ``hidden`` = Linear(d, K) with bias,
    ``output`` = Linear(K, D) without bias (PyTorch's default initialisation)."""

    def __init__(self, in_dim: int = 2, width: int = 100, out_dim: int = 2) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, width)
        self.output = nn.Linear(width, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(torch.relu(self.hidden(x)))

    def input_norms(self) -> Tensor:
        """(K,) ||u_k|| = ||(w_k, b_k)||_2."""
        return torch.hypot(torch.linalg.vector_norm(self.hidden.weight, dim=1), self.hidden.bias)


@torch.no_grad()
def mse_gradients_(net: ShallowReLU, X: Tensor, Y: Tensor) -> None:
    """Write the gradients of L = mean over the N*D entries of (net(X) - Y)^2 into ``.grad``.

    X (N, d), Y (N, D). With Z = X W^T + b, H = relu(Z), E = 2 (H V^T - Y) / (N D):
        dL/dV = E^T H,  dL/dZ = (E V) * [Z > 0],  dL/dW = (dL/dZ)^T X,  dL/db = sum_i dL/dZ_i.
    The same numbers as autograd (relu'(0) = 0), at a third of its cost on these tiny
    matrices, where the per-operation overhead is the whole cost.
    """
    W, b, V = net.hidden.weight, net.hidden.bias, net.output.weight
    for p in (W, b, V):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    Z = torch.addmm(b, X, W.t())
    H = torch.relu(Z)
    E = torch.addmm(Y, H, V.t(), beta=-1.0).mul_(2.0 / Y.numel())
    torch.mm(E.t(), H, out=V.grad)
    dZ = torch.mm(E, V).mul_(Z > 0)
    torch.mm(dZ.t(), X, out=W.grad)
    torch.sum(dZ, dim=0, out=b.grad)


@torch.no_grad()
def proximal_map_(net: ShallowReLU, threshold: float) -> None:
    """The proximal step of the module docstring, in place: v_k <- group soft-threshold of
    v_k by ``threshold`` (= lr * lambda), u_k <- u_k / ||u_k||. A neuron with u_k = 0 is left
    as it is (it computes 0 whatever its direction). About 10 tensor operations: this runs
    after every one of the 1e6 SGD iterations."""
    scale = net.input_norms().clamp_min_(torch.finfo(net.hidden.bias.dtype).tiny)  # u_k = 0 stays 0
    net.hidden.weight.div_(scale.unsqueeze(1))
    net.hidden.bias.div_(scale)
    net.output.weight.copy_(group_soft_threshold(net.output.weight, threshold))


@torch.no_grad()
def normalise_inputs_keeping_function_(net: ShallowReLU) -> None:
    """u_k <- u_k / ||u_k||, v_k <- ||u_k|| v_k: the same function, input vectors on the sphere."""
    scale = net.input_norms()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    net.hidden.weight.div_(scale.unsqueeze(1))
    net.hidden.bias.div_(scale)
    net.output.weight.mul_(scale)


@torch.no_grad()
def path_penalty(net: ShallowReLU) -> Tensor:
    """sum_k ||u_k|| ||v_k||: the weight-decay penalty at its best rescaling (scalar)."""
    return torch.sum(net.input_norms() * group_norms(net.output.weight))


@torch.no_grad()
def amplitudes(net: ShallowReLU) -> Tensor:
    """(D, K) |V[j, k]| ||u_k||: neuron k's weight for output j once u_k has unit norm
    (invariant under the rescalings that leave the function unchanged)."""
    return net.output.weight.abs() * net.input_norms().unsqueeze(0)


@torch.no_grad()
def active_mask(net: ShallowReLU, tol: float) -> Tensor:
    """(D, K) boolean: neuron k is active for output j if its amplitude exceeds ``tol``
    times the largest amplitude of the network (a relative threshold: see the README)."""
    amp = amplitudes(net)
    top = amp.max()
    if top == 0:
        return torch.zeros_like(amp, dtype=torch.bool)
    return amp > tol * top


def neuron_report(net: ShallowReLU, tol: float) -> dict[str, int]:
    """Counts of active neurons: ``active_output{j}`` per output, ``shared`` (active for every
    output), ``active`` (for at least one output), and ``width``."""
    mask = active_mask(net, tol)
    report = {f"active_output{j}": int(mask[j].sum()) for j in range(mask.shape[0])}
    report["shared"] = int(mask.all(dim=0).sum())
    report["active"] = int(mask.any(dim=0).sum())
    report["width"] = int(mask.shape[1])
    return report


@torch.no_grad()
def knots(W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Neuron coordinates of the figure for d = 2: W (K, 2), b (K,) -> (theta, offset), both (K,).

    relu(w.x + b) = ||w|| relu(e_theta.x + b / ||w||) with e_theta = (cos theta, sin theta):
    theta = atan2(w_2, w_1) in (-pi, pi] is the direction of the neuron, offset = b / ||w||
    places its kink on the line e_theta.x = -offset. A neuron with w = 0 gets theta = 0 and
    offset = sign(b) * inf (it is constant on R^2).
    """
    if W.shape[1] != 2:
        raise ValueError(f"knots are defined for 2-dimensional inputs, got W of shape {tuple(W.shape)}")
    norm_w = torch.linalg.vector_norm(W, dim=1)
    theta = torch.atan2(W[:, 1], W[:, 0])
    offset = torch.where(norm_w > 0, b / torch.where(norm_w > 0, norm_w, torch.ones_like(norm_w)),
                         torch.sign(b) * math.inf)
    return theta, offset
