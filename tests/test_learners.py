"""The base learner: analytic gradients, inner loop, second-order meta-gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metatransfer.learners import adapt, cross_entropy_grads, linear_logits


def test_analytic_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    tasks, shots, ways, dim = 3, 7, 4, 5
    w = torch.randn(tasks, ways, dim, generator=g, requires_grad=True)
    b = torch.randn(tasks, ways, generator=g, requires_grad=True)
    x = torch.randn(tasks, shots, dim, generator=g)
    y = torch.randint(0, ways, (tasks, shots), generator=g)
    loss = sum(F.cross_entropy(linear_logits(w, b, x)[t], y[t]) for t in range(tasks))
    auto_w, auto_b = torch.autograd.grad(loss, (w, b))
    grad_w, grad_b = cross_entropy_grads(w, b, x, F.one_hot(y, ways).float())
    torch.testing.assert_close(grad_w, auto_w)
    torch.testing.assert_close(grad_b, auto_b)


def test_one_inner_step_by_hand():
    # one task, one sample, two classes, theta = 0: softmax is uniform (0.5, 0.5)
    x = torch.tensor([[[2.0, -1.0]]])
    y = torch.tensor([[1]])
    w, b = adapt(torch.zeros(2, 2), torch.zeros(2), x, y, ways=2, steps=1, lr=0.1)
    # grad_w = (p - onehot)^T x = [[0.5*2, 0.5*-1], [-0.5*2, -0.5*-1]]
    torch.testing.assert_close(w[0], -0.1 * torch.tensor([[1.0, -0.5], [-1.0, 0.5]]))
    torch.testing.assert_close(b[0], -0.1 * torch.tensor([0.5, -0.5]))


def test_inner_loop_lowers_support_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, 16, generator=g)
    y = torch.arange(5).repeat(2).expand(4, -1)
    w0, b0 = torch.zeros(5, 16), torch.zeros(5)

    def loss(w, b):
        return F.cross_entropy(linear_logits(w, b, x).reshape(-1, 5), y.reshape(-1))

    before = loss(w0.expand(4, -1, -1), b0.expand(4, -1))
    w, b = adapt(w0, b0, x, y, ways=5, steps=50, lr=0.1)
    assert loss(w, b) < 0.5 * before


def _meta_loss(theta0, bias0, scale, support, s_labels, query, q_labels, first_order):
    """Query loss after adaptation on features ``scale * x`` (a stand-in for SS)."""
    w, b = adapt(theta0, bias0, support * scale, s_labels, 3, steps=5, lr=0.5,
                 first_order=first_order)
    logits = linear_logits(w, b, query * scale)
    return F.cross_entropy(logits.reshape(-1, 3), q_labels.reshape(-1))


def test_second_order_meta_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    dt = torch.float64
    support = torch.randn(2, 6, 4, generator=g, dtype=dt)
    query = torch.randn(2, 9, 4, generator=g, dtype=dt)
    s_labels = torch.arange(3).repeat_interleave(2).expand(2, -1)
    q_labels = torch.arange(3).repeat_interleave(3).expand(2, -1)
    theta0 = torch.randn(3, 4, generator=g, dtype=dt, requires_grad=True)
    bias0 = torch.randn(3, generator=g, dtype=dt, requires_grad=True)
    scale = (1 + 0.1 * torch.randn(4, generator=g, dtype=dt)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t, b, s: _meta_loss(t, b, s, support, s_labels, query, q_labels, False),
        (theta0, bias0, scale))


def test_first_order_ignores_the_path_through_the_support_set():
    g = torch.Generator().manual_seed(3)
    support = torch.randn(1, 6, 4, generator=g, requires_grad=True)
    query = torch.randn(1, 9, 4, generator=g)
    s_labels = torch.arange(3).repeat_interleave(2)[None]
    q_labels = torch.arange(3).repeat_interleave(3)[None]
    theta0 = torch.zeros(3, 4, requires_grad=True)
    w, b = adapt(theta0, torch.zeros(3), support, s_labels, 3, 5, 0.5, first_order=True)
    loss = F.cross_entropy(linear_logits(w, b, query)[0], q_labels[0])
    grad_theta, grad_support = torch.autograd.grad(loss, (theta0, support), allow_unused=True)
    assert grad_support is None
    # first order: d loss / d theta_0 equals d loss / d theta' (the update is a constant)
    w_prime = w.detach().requires_grad_()
    direct = torch.autograd.grad(
        F.cross_entropy(linear_logits(w_prime, b.detach(), query)[0], q_labels[0]), w_prime)[0]
    torch.testing.assert_close(grad_theta, direct[0])
