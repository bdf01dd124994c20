"""Quintic Newton-Schulz orthogonalization, the core of Muon and NorMuon.

Method: K. Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024),
https://kellerjordan.github.io/posts/muon/ (reference code: KellerJordan/Muon, muon.py), and
PyTorch's ``torch.optim.Muon`` (torch/optim/_muon.py), whose operation sequence this file follows
so that a single-device step agrees with it bit for bit on CPU. Written for neotron, not copied.

For G = U S V^T, the iteration X <- a X + (b A + c A^2) X with A = X X^T applies the odd
polynomial p(s) = a s + b s^3 + c s^5 to every singular value and leaves U, V alone. The
coefficients maximize p'(0) rather than converge to 1, so after five steps a singular value
s / ||G||_F >= 2e-3 lands in about [0.68, 1.20] (not exactly 1): the output is U S' V^T, which
Muon uses in place of U V^T (see docs/optimizers.md for the measured band).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NS_COEFFICIENTS", "zeropower_via_newtonschulz5"]

# (a, b, c) of the quintic, from Jordan's post; torch.optim.Muon uses the same three numbers.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(
    G: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately orthogonalize ``G`` (``U S V^T -> U S' V^T``, S' in about [0.68, 1.2]).

    Args:
        G: a matrix ``[m, n]`` or a batch of same-shape matrices ``[..., m, n]``; every matrix
            of a batch is orthogonalized on its own (own norm, own iteration), so a batch gives
            what a loop over its matrices would.
        steps: Newton-Schulz iterations (5 in every reference implementation).
        eps: added to each matrix's Frobenius norm before dividing by it, so a zero matrix maps
            to zero instead of NaN. (torch.optim.Muon clamps the norm at eps instead; the two
            agree bit for bit whenever the bf16 norm is >= ~3e-5, since adding 1e-7 to such a
            bf16 number rounds back to it.)
        compute_dtype: dtype of the iteration. bf16 by default, as in every reference: the
            polynomial is self-correcting, so bf16 rounding only perturbs S' inside its band.
            float32 is for tests and for checking how much bf16 costs.

    Returns:
        A tensor of ``G``'s shape and **``G``'s dtype**. The values are those of the
        ``compute_dtype`` iteration (for bf16: bf16-representable numbers); casting them up is
        exact, so applying this fp32 result to an fp32 param equals adding the bf16 result to
        it, which is what torch.optim.Muon does. NorMuon's row normalization then runs on the
        upcast values instead of in bf16.
    """
    if G.ndim < 2:
        raise ValueError(
            f"zeropower_via_newtonschulz5 needs a matrix or a batch of matrices [..., m, n], "
            f"got shape {tuple(G.shape)}"
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a, b, c = NS_COEFFICIENTS
    batch_shape = G.shape[:-2]
    # Work on the wide orientation (m <= n): the Gram matrix X X^T is then the small one, m x m.
    # NS(G^T) = NS(G)^T, so transposing in and out changes nothing but the cost.
    transposed = G.size(-2) > G.size(-1)
    X = G.to(compute_dtype)
    if G.ndim > 2:
        # Flatten any leading dims to one batch dim so bmm/baddbmm apply; reshaped back below.
        X = X.reshape(-1, G.size(-2), G.size(-1))
    if transposed:
        X = X.mT
    # Frobenius normalization bounds the spectral norm by 1, inside p's basin. Out of place: for
    # a bf16 input, .to() returns the input itself, which must not be modified.
    norm = X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)
    X = X / (norm + eps)
    for _ in range(steps):
        if X.ndim == 2:
            # addmm (fused a*M + b*M1@M2, one rounding) is the exact op sequence torch uses.
            gram = X @ X.mT
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
            X = torch.addmm(X, poly, X, beta=a)  # a*X + (b*A + c*A^2) @ X
        else:
            gram = torch.bmm(X, X.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            X = torch.baddbmm(X, poly, X, beta=a)
    if transposed:
        X = X.mT
    if G.ndim > 2:
        X = X.reshape(*batch_shape, G.size(-2), G.size(-1))
    return X.to(G.dtype)
