"""ZCA whitening of image datasets, in the forms the papers use.

For flattened images ``X`` ``[N, D]`` (``D = C*H*W``) with mean ``mu`` and unbiased covariance
``Sigma = U diag(s) U^T``:

    whiten(x)  = (x - mu) @ U diag(1 / sqrt(s + eps)) U^T
    inverse(z) = z @ U diag(sqrt(s + eps)) U^T + mu

The forms differ in ``eps`` (``dataset.zca_form``):

- ``absolute`` (MTT, Cazenavette et al. CVPR 2022, ``--zca``: ``utils.get_dataset`` fits kornia's
  ``ZCAWhitening(eps=0.1)`` on the full training set): ``eps = regularization`` is added to every eigenvalue. It
  depends on the scale of the input, which is why the MTT reference whitens ``ToTensor`` pixels in [0, 1] without
  mean/std normalization (ddrun's loaders do the same for this form).
- ``relative`` (KIP, Nguyen et al. ICLR 2021 / NeurIPS 2021; RFAD, Loo et al. NeurIPS 2022, ``data.get_zca_matrix``;
  FRePo, Zhou et al. NeurIPS 2022, ``lib/dataset/ops.get_whitening_transform``): ``eps = regularization * tr(Sigma)
  / D``, a fraction of the mean eigenvalue (0.1 in all three), so the transform does not depend on the input's
  scale. The references whiten mean/std-normalized images (ddrun's loaders keep the normalization for this form).
  With 3-channel 32x32 images the mean eigenvalue of [0, 1] pixels is about 0.06, so 0.1 relative is ~0.006
  absolute: roughly 16x weaker than MTT's 0.1 on the same pixels.

Centring (``dataset.zca_centre``, default true): with ``false`` the mean is not subtracted and ``Sigma`` is the
uncentred second-moment matrix ``X^T X / N`` (divided by N, not N - 1); ``whiten(x) = x @ W`` and ``inverse(z) =
z @ W^-1``. This is RFAD's ``data.get_zca_matrix`` / ``transform_data`` (yolky/RFAD ``data.py``), fitted on images
that were mean/std normalized per channel, so the second moment is close to (not equal to) the covariance.
"""

from __future__ import annotations

import torch

from ddrun.schema import ZCA_FORMS
from ddrun.utils import DataError


class ZCA:
    """ZCA whitening fitted on a training set (module doc).

    Args:
        regularization: ``eps`` added to the covariance eigenvalues (``absolute``, MTT / kornia: 0.1), or its
            fraction of the mean eigenvalue ``tr(Sigma) / D`` (``relative``, KIP / RFAD / FRePo: 0.1).
        form: ``absolute`` or ``relative`` (module doc).
        centre: subtract the training mean and whiten the unbiased covariance (true: MTT, KIP, FRePo), or whiten
            the uncentred second moment ``X^T X / N`` without subtracting anything (false: RFAD).
        device: where the covariance and the transforms are computed (``auto``: CUDA when available); the
            results come back on the input's device.
        chunk: rows per matrix product (bounds the extra memory to ``chunk x D`` floats).

    Attributes (after :meth:`fit`): ``mean`` float32 ``[D]`` (the vector subtracted before whitening: zeros when
    ``centre`` is false), ``transform`` and ``inverse_transform`` float32 ``[D, D]``, ``shape`` the ``(C, H, W)``
    it was fitted on, ``eps`` the absolute amount added to the eigenvalues.

    Raises:
        DataError: a negative regularization, an unknown form or a ``centre`` that is not a boolean.
    """

    FORMS = ZCA_FORMS

    def __init__(self, regularization: float = 0.1, device: str = "auto", chunk: int = 4096, form: str = "absolute",
                 centre: bool = True):
        if regularization < 0:
            raise DataError(f"dataset.zca_regularization={regularization}: must be >= 0")
        if form not in self.FORMS:
            raise DataError(f"dataset.zca_form={form!r}: valid values are {list(self.FORMS)}")
        if not isinstance(centre, bool):
            raise DataError(f"dataset.zca_centre={centre!r}: valid values are [true, false]")
        self.regularization, self.device, self.chunk, self.form = float(regularization), device, int(chunk), form
        self.centre = centre
        self.eps: float | None = None
        self.mean = self.transform = self.inverse_transform = None
        self.shape: tuple[int, ...] | None = None

    def _dev(self) -> torch.device:
        from ddrun.utils import resolve_device

        return resolve_device(self.device)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> ZCA:
        """Fit on float images ``[N, C, H, W]`` (N >= 2). Moments accumulated in float64. Returns ``self``.

        Raises:
            DataError: fewer than 2 images; a singular (co)variance with zero regularization; all images equal
                (centred) or all zero (uncentred) when there are fewer images than values.
        """
        dev = self._dev()
        n = len(images)
        if n < 2:
            raise DataError(f"ZCA needs at least 2 training images to fit, got {n}")
        self.shape = tuple(images.shape[1:])
        flat = images.reshape(n, -1)
        d = flat.shape[1]
        mean = torch.zeros(d, dtype=torch.float64, device=dev)
        if self.centre:
            for s in range(0, n, self.chunk):
                mean += flat[s:s + self.chunk].to(dev, torch.float64).sum(0)
            mean /= n
        # the centred covariance divides by N - 1 and has rank <= N - 1; the uncentred moment by N, rank <= N
        dof = n - 1 if self.centre else n
        if dof < d:
            transform, inverse, eps = self._fit_low_rank(flat, mean, dof, dev)
        else:
            transform, inverse, eps = self._fit_full(flat, mean, dof, dev)
        self.mean, self.eps = mean.float(), eps
        self.transform, self.inverse_transform = transform.float(), inverse.float()
        return self

    def _fit_low_rank(self, flat: torch.Tensor, mean: torch.Tensor, dof: int, dev: torch.device):
        """Fewer images than values: the (second-)moment matrix has rank <= ``dof``; its eigenvectors with non-zero
        eigenvalue come from the thin SVD of the (centred) data, the rest of the space has eigenvalue 0."""
        n, d = flat.shape
        if self.regularization <= 0:
            raise DataError(f"ZCA: {n} images of {d} values give a singular covariance; "
                            f"dataset.zca_regularization must be > 0")
        _, sv, vh = torch.linalg.svd(flat.to(dev, torch.float64) - mean, full_matrices=False)
        lam, v = sv**2 / dof, vh.T
        eps = self._eps(float(lam.sum()), d)
        if eps <= 0:
            raise DataError(f"ZCA: the {n} training images are all {'equal' if self.centre else 'zero'}; "
                            f"nothing to whiten")
        eye = torch.eye(d, dtype=torch.float64, device=dev)
        transform = eye / eps**0.5 + (v * ((lam + eps).rsqrt() - eps**-0.5)) @ v.T
        inverse = eye * eps**0.5 + (v * ((lam + eps).sqrt() - eps**0.5)) @ v.T
        return transform, inverse, eps

    def _fit_full(self, flat: torch.Tensor, mean: torch.Tensor, dof: int, dev: torch.device):
        """At least as many images as values: eigendecomposition of the ``[D, D]`` (second-)moment matrix."""
        n, d = flat.shape
        cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for s in range(0, n, self.chunk):
            xc = flat[s:s + self.chunk].to(dev, torch.float64) - mean
            cov += xc.T @ xc
        cov /= dof
        eps = self._eps(float(torch.trace(cov)), d)
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0) + eps
        if evals.min() <= 0:
            raise DataError("ZCA: the covariance is singular and dataset.zca_regularization is 0")
        return (evecs * evals.rsqrt()) @ evecs.T, (evecs * evals.sqrt()) @ evecs.T, eps

    def _eps(self, trace: float, d: int) -> float:
        """The absolute amount added to the eigenvalues: ``regularization`` or ``regularization * trace / d``."""
        return self.regularization if self.form == "absolute" else self.regularization * trace / d

    def _apply(self, x: torch.Tensor, matrix: torch.Tensor, before: torch.Tensor | None,
               after: torch.Tensor | None) -> torch.Tensor:
        if self.transform is None:
            raise RuntimeError("ZCA.fit must be called first")
        if tuple(x.shape[1:]) != self.shape:
            raise DataError(f"ZCA was fitted on images of shape {self.shape}, got {tuple(x.shape[1:])}")
        dev = x.device if x.requires_grad else self._dev()
        m = matrix.to(dev, x.dtype)
        flat = x.reshape(len(x), -1)
        outs = []
        for s in range(0, len(x), self.chunk):
            part = flat[s:s + self.chunk].to(dev)
            if before is not None:
                part = part - before.to(dev, x.dtype)
            part = part @ m
            if after is not None:
                part = part + after.to(dev, x.dtype)
            outs.append(part.to(x.device))
        out = torch.cat(outs) if outs else flat.clone()
        return out.reshape(x.shape)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten float images ``[N, C, H, W]`` (the shape fitted on); same shape, dtype and device."""
        return self._apply(images, self.transform, self.mean if self.centre else None, None)

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        """Map whitened images back to the input space of :meth:`fit` (for pictures); same shape."""
        return self._apply(images, self.inverse_transform, None, self.mean if self.centre else None)
