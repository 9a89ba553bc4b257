"""Weighting strategies on small cases whose answer is known."""

import math

import pytest
import torch

from raymtl.engine import backward_with_weighting
from raymtl.errors import ConfigError
from raymtl.models import create_model
from raymtl.tasks import TaskSpec
from raymtl.weighting import WEIGHTINGS, Weighting, create_weighting
from raymtl.weighting.aligned_mtl import aligned_weights
from raymtl.weighting.fairgrad import fairgrad_weights
from raymtl.weighting.mgda import min_norm_weights

TWO = ["a", "b"]


def test_registry_holds_the_eight_strategies_and_rejects_unknown_names():
    assert set(WEIGHTINGS.names()) == {
        "ls",
        "uw",
        "rlw",
        "dwa",
        "pcgrad",
        "mgda",
        "aligned_mtl",
        "fairgrad",
    }
    with pytest.raises(
        ConfigError, match="unknown weighting strategy 'nash'; available: aligned_mtl"
    ):
        create_weighting("nash", TWO)


def test_ls_sums_losses():
    assert create_weighting("ls", TWO).combine(torch.tensor([1.0, 2.5])).item() == pytest.approx(
        3.5
    )


def test_pcgrad_projects_two_conflicting_gradients():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1' = g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2' = g2 - (g2.g1/|g1|^2) g1 = (0, 1)
    out = create_weighting("pcgrad", TWO).aggregate(grads)
    assert out.tolist() == pytest.approx([0.5, 1.5])
    # each projected gradient no longer conflicts with the other task's gradient
    assert (torch.tensor([0.5, 0.5]) @ grads[1]).item() == pytest.approx(0.0)


def test_pcgrad_leaves_agreeing_gradients_alone():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert create_weighting("pcgrad", TWO).aggregate(grads).tolist() == pytest.approx([2.0, 1.0])


def test_mgda_min_norm_point_of_two_vectors():
    # min over a of |a(2,0) + (1-a)(0,1)|^2 = 4a^2 + (1-a)^2  ->  a = 1/5
    alpha = min_norm_weights(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert alpha.tolist() == pytest.approx([0.2, 0.8], abs=1e-6)
    alpha = min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert alpha.tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_mgda_three_vectors_min_norm_point():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    alpha = min_norm_weights(grads)
    assert alpha.sum().item() == pytest.approx(1.0)
    assert (alpha @ grads.double()).tolist() == pytest.approx([0.5, 0.5], abs=1e-5)


def test_mgda_when_one_gradient_is_inside_the_other_returns_the_smaller():
    alpha = min_norm_weights(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert alpha.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_aligned_mtl_equalises_orthogonal_gradients():
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert aligned_weights(grads).tolist() == pytest.approx([1.0, 0.5])
    assert create_weighting("aligned_mtl", TWO).aggregate(grads).tolist() == pytest.approx(
        [1.0, 1.0]
    )


def test_aligned_mtl_on_collinear_gradients_drops_the_null_direction():
    grads = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # M has eigenvalue 5 along v=(1,2)/sqrt5 and 0 (dropped): weights = column sums of v v^T
    assert aligned_weights(grads).tolist() == pytest.approx([0.6, 1.2])
    assert create_weighting("aligned_mtl", TWO).aggregate(grads).tolist() == pytest.approx(
        [3.0, 0.0]
    )


def test_fairgrad_solves_its_fixed_point_on_orthogonal_gradients():
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # (G G^T) w = w^(-1/alpha): alpha=1 -> w1 = 1, 4 w2 = 1/w2 -> w2 = 1/2
    assert fairgrad_weights(grads, alpha=1.0).tolist() == pytest.approx([1.0, 0.5], rel=1e-4)
    # alpha=2 -> 4 w2 = w2^(-1/2) -> w2 = 4^(-2/3)
    assert fairgrad_weights(grads, alpha=2.0).tolist() == pytest.approx(
        [1.0, 4 ** (-2 / 3)], rel=1e-4
    )


def test_fairgrad_residual_vanishes_on_random_agreeing_gradients():
    grads = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    w = fairgrad_weights(grads)
    gram = (grads @ grads.t()).double().numpy()
    assert (gram @ w - 1.0 / w) == pytest.approx([0, 0, 0], abs=1e-5)


def test_uw_log_variance_converges_to_log_of_the_loss():
    uw = create_weighting("uw", TWO)
    losses = torch.tensor([4.0, 0.25])
    assert uw.combine(losses).item() == pytest.approx(0.5 * 4.25)
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        uw.combine(losses).backward()
        optimizer.step()
    assert uw.log_variance.detach().tolist() == pytest.approx(
        [math.log(4.0), math.log(0.25)], abs=1e-3
    )


def test_rlw_weights_are_a_seeded_random_simplex_point_each_step():
    first = create_weighting("rlw", TWO, seed=3)
    second = create_weighting("rlw", TWO, seed=3)
    losses = torch.tensor([1.0, 1.0])
    draws = []
    for _ in range(3):
        first.combine(losses)
        second.combine(losses)
        assert first.last_weights.sum().item() == pytest.approx(1.0)
        assert (first.last_weights > 0).all()
        assert torch.equal(first.last_weights, second.last_weights)
        draws.append(first.last_weights.clone())
    assert not torch.equal(draws[0], draws[1])


def test_dwa_weights_follow_the_loss_descent_rate():
    dwa = create_weighting("dwa", TWO, temperature=2.0)
    assert dwa.current_weights().tolist() == [1.0, 1.0]
    dwa.on_epoch_end(torch.tensor([1.0, 1.0]))
    dwa.on_epoch_end(torch.tensor([0.5, 1.0]))
    e1, e2 = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert dwa.current_weights().tolist() == pytest.approx([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


class _SumOfTaskGradients(Weighting):
    uses_task_gradients = True


def test_gradient_path_with_plain_sum_equals_loss_backward():
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "multiclass", 3)]
    torch.manual_seed(0)
    model = create_model("small_cnn", tasks, width=4)
    model.eval()  # batch-norm statistics must not move between the two passes
    x = torch.rand(4, 3, 16, 16)
    targets = {"a": torch.tensor([0, 1, 1, 0]), "b": torch.tensor([0, 2, 1, 1])}

    def losses():
        out = model(x)
        return torch.stack([t.loss(out[t.name], targets[t.name]).mean() for t in tasks])

    backward_with_weighting(model, losses(), create_weighting("ls", ["a", "b"]))
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    backward_with_weighting(model, losses(), _SumOfTaskGradients(["a", "b"]))
    for ref, p in zip(reference, model.parameters(), strict=True):
        assert torch.allclose(ref, p.grad, atol=1e-6)


def test_gradient_path_sets_shared_grads_to_the_aggregated_direction():
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "binary")]
    torch.manual_seed(1)
    model = create_model("small_cnn", tasks, width=4)
    model.eval()
    x = torch.rand(4, 3, 16, 16)
    out = model(x)
    losses = torch.stack([t.loss(out[t.name], torch.tensor([0, 1, 1, 0])).mean() for t in tasks])
    shared = list(model.shared_parameters())
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(losses[k], shared, retain_graph=True)])
        for k in range(2)
    ]
    expected = create_weighting("mgda", ["a", "b"]).aggregate(torch.stack(rows))
    backward_with_weighting(model, losses, create_weighting("mgda", ["a", "b"]))
    got = torch.cat([p.grad.flatten() for p in shared])
    assert torch.allclose(got, expected, atol=1e-6)
