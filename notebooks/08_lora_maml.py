# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---


# %% [markdown]
# # Meta-learning a LoRA initialization for a small language model
#
# A common recipe for few-shot adaptation of a language model: freeze the
# pretrained weights, attach low-rank adapters (LoRA) and adapt only those on
# each task's few examples. MAML can then *meta-learn the adapters' starting
# point* (and here the inner learning rate too), so that a few gradient steps
# on a new task's support set go as far as possible.
#
# This notebook does that, second order, on a LLaMA-style decoder (grouped-query
# attention, rotary embeddings) built from a tiny config, with `peft`'s LoRA
# adapters, on synthetic few-shot tasks. Nothing is downloaded. The model runs
# attention with torch's default (fused) kernels: fparams runs its inner steps
# on the math kernel, which has the double backward a second-order
# meta-gradient needs (see `docs/guides/architectures.md`).
#
# It needs the `models` extra: `pip install -e .[models]` (transformers, peft).

# %%
import json
import os
import subprocess
import sys
import textwrap

import matplotlib.pyplot as plt
import peft
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import fparams

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

# %% [markdown]
# ## A tiny decoder with LoRA adapters
#
# The base weights are frozen (detached); only the LoRA matrices of the value
# projection and of the output head are meta-parameters, and only they adapt
# in the inner loop (`filter` is not even needed: `adapt` only sees them).

# %%
V, L = 8, 3  # vocabulary, sequence length (short: one sequence says little about its task)
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L,
    pad_token_id=None, bos_token_id=None, eos_token_id=None,
)
lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "lm_head"], lora_dropout=0.0)
model = peft.get_peft_model(LlamaForCausalLM(config), lora)
arch, params, buffers = fparams.split(model)
adapters = {k: p.detach().clone().requires_grad_() for k, p in params.items() if "lora_" in k}
frozen = {k: p.detach() for k, p in params.items() if "lora_" not in k}
print(f"{sum(p.numel() for p in frozen.values())} frozen weights, "
      f"{sum(p.numel() for p in adapters.values())} LoRA weights in {len(adapters)} matrices")

# %% [markdown]
# ## Few-shot tasks
#
# Each task is a language over the 8 tokens in which one token, chosen per
# task, makes up 70% of the text. A task's support set is 16 sequences of 3
# tokens, its query set 16 more: a single sequence says little about its task,
# the support set as a whole says which token it favours. The best possible loss is the entropy of the task's
# distribution, about 1.19 nats; a model that knows nothing scores log 8 = 2.08.


# %%
def sample_tasks(num_tasks, shots, gen=None):
    """Support and query sequences of each task, (num_tasks, shots, L) each."""
    favourite = torch.randint(0, V, (num_tasks, 1), generator=gen)
    probs = torch.full((num_tasks, V), 0.3 / (V - 1)).scatter(1, favourite, 0.7)
    ids = torch.multinomial(probs, 2 * shots * L, replacement=True, generator=gen)
    return ids.view(num_tasks, 2, shots, L).unbind(1)


def lm_loss(p, ids):
    logits = arch({**frozen, **p}, input_ids=ids[:, :-1], buffers=buffers).logits
    return F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))


def task_losses(p, support, query):
    """The query loss before and after two second-order inner steps on the support set.

    The learned inner rate `log_lr` (defined below) is shared by every task: a closure.
    """
    fast = fparams.adapt(lm_loss, p, support, lr=log_lr.exp(), steps=2)
    return torch.stack([lm_loss(p, query), lm_loss(fast, query)])


entropy = -(0.7 * torch.tensor(0.7).log() + 0.3 * torch.tensor(0.3 / 7).log()).item()
print(f"best possible loss {entropy:.2f}, chance {torch.tensor(float(V)).log().item():.2f}")

# %% [markdown]
# ## Meta-training
#
# `map_tasks` runs the four tasks of a meta-batch at once (vmap); the
# meta-gradient reaches the LoRA initialization and the (log) inner learning
# rate through both inner steps.

# %%
log_lr = torch.tensor(-2.0, requires_grad=True)
start = {k: p.detach().clone() for k, p in adapters.items()}
meta_opt = torch.optim.Adam([*adapters.values(), log_lr], lr=1e-2)
mapped = fparams.map_tasks(task_losses)
steps_seen = []
for _ in range(120):
    support, query = sample_tasks(4, 16)
    losses = mapped(adapters, support, query)  # (tasks, [before, after])
    meta_opt.zero_grad()
    losses[:, 1].mean().backward()
    meta_opt.step()
    steps_seen.append(losses.detach().mean(0))
history = torch.stack(steps_seen)
print(f"inner learning rate learned: {log_lr.exp().item():.3f}")

# %% [markdown]
# ## Before and after adaptation, on new tasks

# %%
def evaluate(p, rate, num_tasks=32):
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # no meta-gradient needed: first-order inner steps, fast kernels
        support, query = sample_tasks(num_tasks, 16, gen)
    out = []
    for i in range(num_tasks):
        fast = fparams.adapt(lm_loss, p, support[i], lr=rate, steps=2, first_order=True)
        out.append([lm_loss(p, query[i]).item(), lm_loss(fast, query[i]).item()])
    return torch.tensor(out).mean(0)


initial = evaluate({k: t.requires_grad_() for k, t in start.items()}, 0.135)
learned = evaluate(adapters, log_lr.exp().item())
print(f"initial LoRA:      before {initial[0]:.3f}, after adaptation {initial[1]:.3f}")
print(f"meta-learned LoRA: before {learned[0]:.3f}, after adaptation {learned[1]:.3f}")

# %%
def smooth(x, k=15):
    return torch.nn.functional.avg_pool1d(x[None, None], k, 1, padding=k // 2, count_include_pad=False)[0, 0]


fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.plot(smooth(history[:, 0]), label="query loss before adaptation")
left.plot(smooth(history[:, 1]), label="query loss after 2 inner steps")
left.axhline(entropy, color="gray", ls=":", label="best possible")
left.set_xlabel("meta-step")
left.set_ylabel("cross-entropy (nats)")
left.set_title("Meta-training (running mean)")
left.legend()
x = torch.arange(2)
right.bar(x - 0.2, initial, 0.4, label="initial LoRA")
right.bar(x + 0.2, learned, 0.4, label="meta-learned LoRA")
right.set_xticks(x, ["before adaptation", "after adaptation"])
right.axhline(entropy, color="gray", ls=":")
right.set_ylim(1.0, None)
right.set_title("32 new tasks")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Memory: `adapt(checkpoint=True)`
#
# A second-order inner loop keeps every step's activations for the outer
# backward pass, so memory grows with the number of inner steps.
# `checkpoint=True` recomputes them instead (the same meta-gradient). Each
# measurement is the peak resident memory of one meta-step in a fresh Python
# process, on a larger sibling of the model above (64 wide, 2 layers, 16
# sequences of 32 tokens): `VmHWM` from `/proc` where there is one, else
# `resource.getrusage`'s high-water mark; where neither exists the notebook
# says so and skips the plot.

# %%
STEP = textwrap.dedent(
    """
    import json, os, sys, torch, torch.nn.functional as F, peft, transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    import fparams

    def peak_mib():
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        try:
            import resource
        except ImportError:
            return None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere

    steps, checkpoint = int(sys.argv[1]), sys.argv[2] == "1"
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    arch, params, buffers = fparams.split(peft.get_peft_model(LlamaForCausalLM(config), lora))
    adapters = {k: p.detach().requires_grad_() for k, p in params.items() if "lora_" in k}
    frozen = {k: p.detach() for k, p in params.items() if "lora_" not in k}
    ids = torch.randint(0, 64, (16, 32))

    def loss(p, ids):
        logits = arch({**frozen, **p}, input_ids=ids[:, :-1], buffers=buffers).logits
        return F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))

    before = peak_mib()
    fast = fparams.adapt(loss, adapters, ids, lr=0.1, steps=steps, checkpoint=checkpoint)
    loss(fast, ids).backward()
    after = peak_mib()
    print(json.dumps(None if before is None else after - before))
    """
)


def peak(steps, checkpoint):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the system
    out = subprocess.run([sys.executable, "-c", STEP, str(steps), str(int(checkpoint))],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


ks = [2, 8]
unrolled = [peak(k, False) for k in ks]
checkpointed = [peak(k, True) for k in ks]
measured = None not in unrolled + checkpointed
if measured:
    for k, u, c in zip(ks, unrolled, checkpointed):
        print(f"{k} inner steps: unrolled {u:5.0f} MiB, checkpoint=True {c:5.0f} MiB")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ks, unrolled, "o-", label="adapt")
    ax.plot(ks, checkpointed, "s-", label="adapt(checkpoint=True)")
    ax.set_xticks(ks)
    ax.set_xlabel("inner steps")
    ax.set_ylabel("peak memory of one meta-step (MiB)")
    ax.legend()
    plt.show()
else:
    print("this system reports no peak memory (no /proc, no resource module): skipped")

# %% [markdown]
# ## Self-check
#
# What this notebook shows, checked so that CI notices when it drifts.

# %%
assert learned[1] < initial[0] - 0.2, (initial, learned)  # meta-learning and adaptation pay off
assert learned[1] < learned[0]  # and the inner steps help on new tasks
if measured:
    assert checkpointed[-1] < unrolled[-1], (checkpointed, unrolled)
