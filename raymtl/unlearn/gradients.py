"""Per-sample gradients (torch.func) and the subspace algebra of interference-aware unlearning.

Per-sample gradients are taken with the model in eval mode (BatchNorm uses its running
statistics), so that each sample's gradient depends on that sample alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from raymtl.models.mtl import MultiTaskModel
from raymtl.tasks import TaskSpec


def split_parameters(
    model: nn.Module, names: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The named parameters (differentiated) and everything else with the buffers (held fixed),
    detached, for ``functional_call`` under torch.func. Channels-last weights are copied to the
    default layout: vmap has no batching rule for the strided copies they cause."""
    wanted = set(names)
    params = {n: p.detach().contiguous() for n, p in model.named_parameters() if n in wanted}
    frozen = {n: p.detach().contiguous() for n, p in model.named_parameters() if n not in wanted}
    frozen.update(dict(model.named_buffers()))
    return params, frozen


def weighted_loss(
    outputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    tasks: Sequence[TaskSpec],
) -> Tensor:
    """Σ_t Σ_i w_t[i]·ℓ_t(x_i) over the tasks that have weights (a batch, or one sample)."""
    total = next(iter(outputs.values())).new_zeros((), dtype=torch.float32)
    for task in tasks:
        if task.name in weights:
            loss = task.loss(outputs[task.name].float(), targets[task.name])
            total = total + (weights[task.name].to(loss.dtype) * loss).sum()
    return total


def per_sample_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    tasks: Sequence[TaskSpec],
    names: Sequence[str],
) -> dict[str, Tensor]:
    """Gradient of Σ_t w_t[i]·ℓ_t(x_i) for every sample i, w.r.t. the named parameters:
    {name: [B, *shape]}. ``weights`` are per-sample task weights (0 drops a pair). When no
    named parameter is in a multi-task model's encoder, the encoder runs once on the batch and
    only the necks and heads run per sample."""
    params, frozen = split_parameters(model, names)
    net: nn.Module = model
    inputs, extra, prefix = images, (), ""
    if isinstance(model, MultiTaskModel) and not any(n.startswith("encoder.") for n in names):
        with torch.no_grad():  # eval mode: each sample's features are its own
            inputs = model.encoder(images).contiguous()
        net, extra, prefix = _Decoder(model), ((images.shape[-2], images.shape[-1]),), "model."
        params = {prefix + n: p for n, p in params.items()}
        frozen = {prefix + n: p for n, p in frozen.items() if not n.startswith("encoder.")}

    def loss_one(
        trainable: dict[str, Tensor], x: Tensor, target: dict[str, Tensor], w: dict[str, Tensor]
    ) -> Tensor:
        outputs = functional_call(net, {**trainable, **frozen}, (x[None], *extra))
        return weighted_loss(outputs, {k: v[None] for k, v in target.items()}, w, tasks)

    used = {t.name for t in tasks if t.name in weights}
    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(
        params,
        inputs,
        {k: v for k, v in targets.items() if k in used},
        {k: weights[k].to(images.dtype) for k in used},
    )
    return {n.removeprefix(prefix): g for n, g in grads.items()}


class _Decoder(nn.Module):
    """A multi-task model after its encoder, as a module of its own (for ``functional_call``)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        return self.model.decode(features, size)


def weighted_loss_gradient(
    model: nn.Module,
    images: Tensor,
    targets: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    tasks: Sequence[TaskSpec],
    params: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Gradient of Σ_t Σ_i w_t[i]·ℓ_t(x_i) w.r.t. ``params`` (zeros where unused): the sum of
    ``per_sample_gradients`` over the batch, from one batched backward pass."""
    with torch.enable_grad():
        total = weighted_loss(model(images), targets, weights, tasks)
    names = list(params)
    grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
    return {
        n: torch.zeros_like(params[n]) if g is None else g
        for n, g in zip(names, grads, strict=True)
    }


def per_sample_task_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Mapping[str, Tensor],
    tasks: Sequence[TaskSpec],
    names: Sequence[str],
) -> dict[str, Tensor]:
    """Every task's loss gradient for every sample, w.r.t. the named parameters:
    {name: [B, T, *shape]} (T in the order of ``tasks``). One forward pass per sample serves all
    tasks (a Jacobian of the task-loss vector), instead of one per (sample, task)."""
    params, frozen = split_parameters(model, names)

    def losses_one(
        trainable: dict[str, Tensor], image: Tensor, target: dict[str, Tensor]
    ) -> Tensor:
        outputs = functional_call(model, {**trainable, **frozen}, (image[None],))
        return torch.stack(
            [task.loss(outputs[task.name].float(), target[task.name][None]).sum() for task in tasks]
        )

    used = {t.name for t in tasks}
    return vmap(jacrev(losses_one), in_dims=(None, 0, 0))(
        params, images, {k: v for k, v in targets.items() if k in used}
    )


def orthonormal_basis(columns: Sequence[Tensor], tolerance: float = 1e-6) -> Tensor | None:
    """An orthonormal basis [p, r] of the span of the given column blocks [p, k_i] (numerically
    dependent directions dropped); None when the span is empty."""
    blocks = [c for c in columns if c is not None and c.numel() and c.shape[1]]
    if not blocks:
        return None
    matrix = torch.cat(blocks, dim=1).double()
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if not len(s) or s[0] <= 0:
        return None
    keep = s > tolerance * s[0]
    return u[:, keep].to(blocks[0].dtype)


def top_directions(
    gradients: Tensor, rank: int | None = None, energy: float | None = None
) -> Tensor:
    """The top right-singular vectors [p, r] of a stack of gradients [n, p]: a fixed ``rank``, or
    the fewest that keep an ``energy`` fraction of the squared singular values. Computed from the
    n×n Gram matrix (n ≪ p), so the cost is O(n²·p)."""
    rows = gradients.float()
    values, vectors = torch.linalg.eigh((rows @ rows.T).double())
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)  # descending
    if not len(values) or values[0] <= 0:
        return gradients.new_zeros((gradients.shape[1], 0))
    if energy is not None:
        cumulative = torch.cumsum(values, 0) / values.sum()
        r = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)) + 1)
    else:
        r = rank if rank is not None else len(values)
    r = max(0, min(r, int((values > 1e-6 * values[0]).sum())))  # float32 Gram: noise below
    directions = rows.T @ (vectors[:, :r] / values[:r].sqrt()).float()  # v_i = Aᵀu_i / σ_i
    return directions.to(gradients.dtype).contiguous()


def project_out(vector: Tensor, basis: Tensor | None) -> Tensor:
    """``vector`` minus its component in span(basis) (basis orthonormal [p, r]); shape kept."""
    if basis is None:
        return vector
    flat = vector.reshape(-1)
    return (flat - basis @ (basis.T @ flat)).reshape(vector.shape)


def gram_coefficients(columns: Tensor, tolerance: float = 1e-8) -> Tensor:
    """Coefficients K [k, r] such that ``columns @ K`` is an orthonormal basis of span(columns)
    [p, k]; computed from the small Gram matrix, so the cost is O(p·k²), not an SVD of [p, k]."""
    gram = columns.double().T @ columns.double()
    return gram_coefficients_from(gram, tolerance).to(columns.dtype)


def gram_coefficients_from(gram: Tensor, tolerance: float = 1e-8) -> Tensor:
    """``gram_coefficients`` given the Gram matrix itself (double precision recommended)."""
    if not gram.numel():
        return gram.new_zeros((gram.shape[0], 0))
    values, vectors = torch.linalg.eigh(gram)
    keep = values > tolerance * values.max().clamp_min(1e-300)
    return vectors[:, keep] / values[keep].sqrt()


class JointProjector:
    """Removes from a gradient of one parameter tensor its components in the span of (a) every
    other task's directions and (b) a retain batch's per-sample gradients, exactly and jointly.

    The task bases of all K tasks sit side by side in B [p, Σr]; for target task t the protected
    basis is U_t = B_t·T_t (B_t: every other task's columns, T_t from their Gram matrix). With A
    an orthonormal basis of the retain gradients, span(A ∪ U_t) = span(A) ⊕ span(C), C = U_t − A·M,
    M = AᵀU_t, CᵀC = I − MᵀM. Every product with p rows costs O(p·(m + Σr)); only small matrices
    are factorised, so one projection per task and step stays cheap.
    """

    def __init__(self, task_bases: dict[str, Tensor] | None) -> None:
        self.names = list(task_bases or {})
        if self.names:
            blocks = [task_bases[n] for n in self.names]
            self.columns = torch.cat(blocks, dim=1).float()
            gram = (self.columns.T @ self.columns).double()
            bounds = torch.cumsum(torch.tensor([0] + [b.shape[1] for b in blocks]), 0).tolist()
            self.cols = {
                n: torch.arange(bounds[k], bounds[k + 1]) for k, n in enumerate(self.names)
            }
            self.others = {
                n: torch.cat(
                    [self.cols[o] for o in self.names if o != n]
                    or [torch.zeros(0, dtype=torch.long)]
                )
                for n in self.names
            }
            self.coeffs = {
                n: gram_coefficients_from(gram[idx][:, idx]).float()
                for n, idx in self.others.items()
            }
        self.retain: Tensor | None = None
        self._retain_factors: tuple[Tensor, Tensor | None] | None = None

    def set_retain(self, gradients: Tensor | None) -> None:
        """This step's per-sample retain gradients [m, p] (None: no instance-level part)."""
        if gradients is None or not len(gradients):
            self.retain = None
            return
        self.retain = gradients.float().T  # R [p, m]
        self._retain_factors = None  # made on first use, by _factors

    def _factors(self) -> tuple[Tensor, Tensor | None]:
        """K with A = R·K orthonormal, and AᵀB (None without task bases), for this retain batch;
        computed once per batch, and only for tensors large enough to need them."""
        if self._retain_factors is None:
            assert self.retain is not None
            coeffs = gram_coefficients_from((self.retain.T @ self.retain).double()).float()
            dot = coeffs.T @ (self.retain.T @ self.columns) if self.names else None
            self._retain_factors = (coeffs, dot)
        return self._retain_factors

    def project(self, gradient: Tensor, task: str | None) -> Tensor:
        """``gradient`` minus its component in span(retain gradients ∪ other tasks' directions);
        ``task`` None (or unknown to the projector) leaves out the task part."""
        g = gradient.reshape(-1).float()
        use_task = task in self.coeffs if self.names else False
        # The bases may span the whole tensor: an explicit basis is exact there.
        if self._width(use_task) >= len(g):
            blocks = [self.retain.double()] if self.retain is not None else []
            if use_task:
                blocks.append(self.columns[:, self.others[task]].double())
            basis = orthonormal_basis(blocks, tolerance=1e-6)
            return project_out(g.double(), basis).to(gradient.dtype).reshape(gradient.shape)
        a = None
        if self.retain is not None:
            retain_coeffs, _ = self._factors()
            a = retain_coeffs.T @ (self.retain.T @ g)  # Aᵀg
        if not use_task:
            if a is not None:
                g = g - self.retain @ (retain_coeffs @ a)
            return g.to(gradient.dtype).reshape(gradient.shape)
        idx, t = self.others[task], self.coeffs[task]
        u = t.T @ (self.columns.T @ g)[idx]  # U_tᵀg
        if a is None:
            g = g - self._columns_times(idx, t @ u)
            return g.to(gradient.dtype).reshape(gradient.shape)
        removed_a, z = self._joint_coefficients(task, a, u)
        g = g - self.retain @ (retain_coeffs @ removed_a) - self._columns_times(idx, t @ z)
        return g.to(gradient.dtype).reshape(gradient.shape)

    def _joint_coefficients(self, task: str, a: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Given Aᵀg and U_tᵀg, the coefficients of g's component in span(A ∪ U_t): on A, and
        on C = U_t − A·M (as weights of U_t), from the small matrix CᵀC = I − MᵀM."""
        _, retain_dot_columns = self._factors()
        m = (retain_dot_columns[:, self.others[task]] @ self.coeffs[task]).double()  # M = AᵀU_t
        c_gram = torch.eye(m.shape[1], dtype=torch.float64) - m.T @ m  # CᵀC
        values, vectors = torch.linalg.eigh(c_gram)
        keep = values > 1e-6
        c_dot_g = u.double() - m.T @ a.double()
        z = vectors[:, keep] @ ((vectors[:, keep].T @ c_dot_g) / values[keep])
        removed_a = (a.double() - m @ z).float()  # coefficient on A: A a − A M z
        return removed_a, z.float()

    def _width(self, use_task: bool) -> int:
        """How many basis columns a projection uses: the task columns (when used) and the retain
        gradients."""
        return (self.columns.shape[1] if use_task else 0) + (
            self.retain.shape[1] if self.retain is not None else 0
        )

    def project_many(self, gradients: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``project`` for several target tasks' gradients of this tensor at once: the products
        with the [p, ·] bases become matrix products over all tasks, so the bases are read once
        per step instead of once per task (they dominate the cost on a wide neck)."""
        tasks = list(gradients)
        if not tasks:
            return {}
        first = gradients[tasks[0]]
        batched = (
            len(tasks) > 1
            and self.retain is not None
            and bool(self.names)
            and all(t in self.coeffs for t in tasks)
            and self._width(True) < first.numel()
        )
        if not batched:  # nothing to share, or the exact small-tensor path
            return {t: self.project(g, t) for t, g in gradients.items()}
        g = torch.stack([gradients[t].reshape(-1).float() for t in tasks], dim=1)  # [p, T]
        retain_coeffs, _ = self._factors()
        a = retain_coeffs.T @ (self.retain.T @ g)  # Aᵀg per task [r_A, T]
        columns_dot_g = self.columns.T @ g  # [Σr, T]
        removed_a = torch.empty_like(a)
        on_columns = g.new_zeros((self.columns.shape[1], len(tasks)))
        for k, task in enumerate(tasks):
            idx, t = self.others[task], self.coeffs[task]
            removed_a[:, k], z = self._joint_coefficients(
                task, a[:, k], t.T @ columns_dot_g[idx, k]
            )
            on_columns[idx, k] = t @ z
        g = g - self.retain @ (retain_coeffs @ removed_a) - self.columns @ on_columns
        return {
            task: g[:, k].to(gradients[task].dtype).reshape(gradients[task].shape)
            for k, task in enumerate(tasks)
        }

    def _columns_times(self, idx: Tensor, weights: Tensor) -> Tensor:
        """B[:, idx] @ weights without copying the columns."""
        full = weights.new_zeros(self.columns.shape[1])
        full[idx] = weights
        return self.columns @ full
