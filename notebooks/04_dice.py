# %% [markdown]
# # DiCE: derivatives of every order from samples
#
# A softmax policy with logits $\theta$ picks arm $a$ of a two-armed bandit with probability
# $\pi = \operatorname{softmax}(\theta)$ and gets the fixed reward $r_a$. The expected return and its
# derivatives are known in closed form:
#
# $$J = \sum_a \pi_a r_a, \qquad
#   \frac{\partial J}{\partial \theta_i} = \pi_i (r_i - J), \qquad
#   \frac{\partial^2 J}{\partial \theta_i \partial \theta_j}
#     = \pi_i (\delta_{ij} - \pi_j)(r_i - J) - \pi_i \pi_j (r_j - J).$$
#
# From $n$ sampled arms, the **score-function surrogate** $\frac1n \sum_k \log \pi(a_k)\, r_{a_k}$
# has the right gradient but the wrong second derivative: differentiating it twice drops the
# $\nabla \log \pi \, \nabla \log \pi^\top$ term. **DiCE** (Foerster et al. 2018) multiplies each
# reward by $\boxdot(\log \pi(a_k)) = \exp(\log \pi(a_k) - \bot(\log \pi(a_k)))$, `magic_box`,
# which evaluates to 1 and whose derivatives of every order are unbiased ($\bot$ stops gradients).

# %%
import matplotlib.pyplot as plt
import torch

import fparams

torch.set_num_threads(1)
torch.manual_seed(0)
theta0 = torch.tensor([0.4, -0.3], dtype=torch.float64)
rewards = torch.tensor([1.0, 3.0], dtype=torch.float64)

pi = theta0.softmax(0)
J = (pi * rewards).sum()
true_grad = pi * (rewards - J)
eye = torch.eye(2, dtype=torch.float64)
true_hess = (
    pi[:, None] * (eye - pi[None, :]) * (rewards - J)[:, None]
    - pi[:, None] * pi[None, :] * (rewards - J)[None, :]
)
print("gradient:", true_grad)
print("Hessian:\n", true_hess)


# The closed forms agree with autograd on the exact objective.
def exact(theta):
    return (theta.softmax(0) * rewards).sum()


closed_forms_hold = torch.allclose(torch.func.grad(exact)(theta0), true_grad) and torch.allclose(
    torch.func.hessian(exact)(theta0), true_hess
)
print("closed forms match autograd:", closed_forms_hold)
plt.rcParams["figure.dpi"] = 150  # sharp figures on the site and in Jupyter


# %%
def estimates(surrogate, n, seed=0):
    """Gradient and Hessian of a surrogate objective built from n sampled arms."""
    theta = theta0.clone().requires_grad_()
    generator = torch.Generator().manual_seed(seed)
    arms = torch.multinomial(theta0.softmax(0), n, replacement=True, generator=generator)
    logp = theta.log_softmax(0)[arms]
    objective = surrogate(logp, rewards[arms])
    (grad,) = torch.autograd.grad(objective, theta, create_graph=True)
    hess = torch.stack([torch.autograd.grad(grad[i], theta, retain_graph=True)[0] for i in range(2)])
    return grad.detach(), hess


def dice(logp, r):
    return (fparams.magic_box(logp) * r).mean()


def score_function(logp, r):
    return (logp * r).mean()


sizes = [10**k for k in range(2, 7)]
errors: dict[str, list[tuple[float, float]]] = {"DiCE": [], "score function": []}
for n in sizes:
    for name, surrogate in (("DiCE", dice), ("score function", score_function)):
        grad, hess = estimates(surrogate, n)
        grad_error = (grad - true_grad).abs().max().item()
        errors[name].append((grad_error, (hess - true_hess).abs().max().item()))
for name, rows in errors.items():
    print(name)
    for n, (g, h) in zip(sizes, rows):
        print(f"  n={n:>8}: gradient error {g:.4f}, Hessian error {h:.4f}")

# %% [markdown]
# On the same samples both surrogates have **exactly the same gradient**: $\boxdot(x)$ and $x$
# have the same first derivative. So in the left panel the two curves coincide (drawn wide and
# dotted so that both show); they part in the right panel.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
styles = {
    "DiCE": {"color": "tab:blue", "lw": 5, "alpha": 0.45, "marker": "o", "ms": 9},
    "score function": {"color": "tab:red", "lw": 1.5, "ls": ":", "marker": "x", "ms": 7},
}
reference = [0.5 / n**0.5 for n in sizes]
for ax, which, title in zip(axes, (0, 1), ("first derivative", "second derivative")):
    for name, rows in errors.items():
        ax.loglog(sizes, [row[which] for row in rows], label=name, **styles[name])
    ax.loglog(sizes, reference, color="tab:gray", lw=1, ls="--", label=r"$\propto 1/\sqrt{n}$")
    ax.set_title(f"{title}: largest error against the closed form")
    ax.set_xlabel("samples $n$")
axes[0].set_ylabel("largest absolute error")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# With a million samples both estimators have the gradient right; only DiCE has the Hessian right.
# The score-function surrogate's Hessian converges to the wrong matrix,
# $\mathbb{E}[\nabla^2 \log \pi \; r]$, missing $\mathbb{E}[\nabla \log \pi \, \nabla \log \pi^\top r]$.
#
# ## Self-check
#
# The numbers this notebook states, checked; CI runs every notebook and fails here if one drifts.

# %%
assert closed_forms_hold
dice_grad_err, dice_hess_err = errors["DiCE"][-1]
sf_grad_err, sf_hess_err = errors["score function"][-1]
scale = true_hess.abs().max().item()
assert [row[0] for row in errors["DiCE"]] == [row[0] for row in errors["score function"]]  # same gradients
assert dice_grad_err < 0.01 and sf_grad_err < 0.01, (dice_grad_err, sf_grad_err)
assert dice_hess_err < 0.05 * scale, (dice_hess_err, scale)
assert sf_hess_err > 0.3 * scale, (sf_hess_err, scale)  # biased: does not shrink with samples
assert errors["score function"][-1][1] > 0.5 * errors["score function"][0][1]
print("self-check passed")
