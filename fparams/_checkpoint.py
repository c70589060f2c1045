"""Activation checkpointing for the inner loop: recompute each step in the backward pass.

An unrolled second-order inner loop keeps, for every step, the activations of
its forward pass and of the backward pass that made the inner gradient (the
double-backward graph). :func:`checkpointed_step` runs one step so that every
tensor autograd saves in it is dropped when the step returns, and recomputed
from the step's inputs when the outer backward pass first needs one. The inner
loop then keeps its carry (the parameters and optimizer state) per step, and
one step's activations at a time.

``torch.utils.checkpoint`` (non-reentrant) would recompute a step as soon as
the step's own inner ``autograd.grad`` reads a saved tensor, so every step
would run twice before the outer backward pass even starts. Here the saved
tensors stay until the step returns, through autograd's saved-tensor hooks,
which torch's ``torch.func.grad`` / ``vjp`` / ``jacrev`` refuse. So
checkpointing runs where the inner gradient is taken by plain autograd (and
``fparams.adapt`` leaves it out under ``torch.compile``, which traces the
whole computation into a graph of its own):

* the ``"autograd"`` route (no functorch transform active): the step is
  checkpointed as it is;
* the ``"vmap"`` route (one ``vmap``, ``map_tasks``): the step is checkpointed
  on the physical per-task tensors beneath that vmap, and runs inside a fresh
  ``vmap`` of its own over the tasks, both when it first runs and when it is
  recomputed (by then the outer vmap is gone).

Anywhere else :func:`check_checkpoint` raises, naming what to do instead.

Recomputation replays the step exactly: the same inputs, the RNG state of the
first run (dropout draws the same masks), and copies of the ``buffers`` as
they were before the step (the statistics are updated once per step, as
without checkpointing). A replay that saves different tensors raises.

In-place changes: without checkpointing, torch raises when a tensor it saved
for the backward pass was changed in place before that pass. Here the step's
inputs (the params and optimizer state it starts from, the frozen params, the
support data) are what the recomputation reads; their version counters are
recorded when the step has run and checked before it is recomputed, and a
change raises an :class:`~fparams.FparamsRuntimeError` naming the input,
where the recomputation would otherwise silently differentiate other data.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._call import module_reads
from ._errors import FparamsRuntimeError
from ._grads import grad_route
from ._torch_compat import FUNCTORCH, batched_at, trees as pytree, version

#: ``label(path) -> str``: what the input at ``path`` (a tuple of indices and keys
#: into the step's ``(carry, ctx)``) is, for the in-place error.
Label = Callable[[Sequence[Any]], str]

#: ``body(carry, ctx, buffers) -> carry``: one inner step. ``ctx`` holds every
#: other tensor the step reads (rates, frozen params, the task's arguments), so
#: that the vmap route can hand them to a vmap of its own; ``buffers`` is the
#: state the step updates in place (or None).
Body = Callable[[Any, Any, Any], Any]


class _Saved:
    """What autograd keeps for one saved tensor of a checkpointed step: dropped, then refilled."""

    __slots__ = ("tensor", "shape", "dtype", "source", "version", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        # Detached: autograd puts the graph metadata back when it unpacks, and a
        # recomputed tensor must not keep the recomputation's graph alive.
        self.tensor: Optional[Tensor] = tensor.detach() if tensor.requires_grad else tensor
        self.shape, self.dtype = tensor.shape, tensor.dtype
        # The saved tensor itself, weakly: if it outlives the step (a captured learned rate,
        # a buffer, the data), an in-place change of it before recomputation is detected by its
        # version counter, as autograd detects it for the saved tensors it keeps.
        self.source: Optional[weakref.ReferenceType[Tensor]] = weakref.ref(tensor)
        self.version = -1


class _Region:
    """One checkpointed step: its saved tensors, and how to recompute them.

    On the first run every tensor autograd saves is held as usual, so the
    step's own inner backward pass can use it; when the step returns they are
    all dropped. The first time the outer backward pass needs one of them, the
    step is run again from the same inputs (same RNG state, buffers as they
    were) and every saved tensor still referenced by the graph is refilled, in
    the order they were saved.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        buffers: Optional[Mapping[str, Tensor]],
        inputs: List[Tuple[Tensor, str]],
    ) -> None:
        self.fn, self.args, self.inputs = fn, args, inputs
        self.versions: List[int] = []
        self.buffers = None if buffers is None else {k: t.detach().clone() for k, t in buffers.items()}
        self.devices = sorted({t.device for t in pytree.tree_leaves(args) if isinstance(t, Tensor)}, key=str)
        self.rng = _rng_state(self.devices)
        self.slots: List[weakref.ReferenceType[_Saved]] = []
        #: module buffers the step updated in place, with their values before it
        self.updated: List[Tuple[Tensor, Tensor]] = []
        #: module buffers the step only read: each with its name, version and the values it read
        self.read_only: List[Tuple[Tensor, str, int, Tensor]] = []

    def run(self, buffers: Any) -> Any:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack), module_reads() as reads:
            out = self.fn(*self.args, buffers)
        # Buffers an architecture read from its module: those the step updated in place are state,
        # put back as they were for the recomputation (torch's BatchNorm updates its running
        # statistics without bumping their versions: values tell); those it computed with (saved
        # by autograd, or normalized with by fparams' layers) are watched like its inputs.
        sources = {id(source) for _, source in self._sources()}
        for key, read in reads.buffers.items():
            if version(read.tensor) != read.version or not torch.equal(read.tensor, read.value):
                self.updated.append((read.tensor, read.value))
            elif key in reads.used or key in sources:
                label = f"the module's buffer {read.name!r} (read from the module, not passed as buffers=)"
                self.read_only.append((read.tensor, label, read.version, read.value))
        # after the run: a change the step made itself is part of what it computed
        self.versions = [version(t) for t, _ in self.inputs]
        for ref in self.slots:
            saved = ref()
            if saved is not None:
                saved.tensor = None
                source = saved.source() if saved.source is not None else None
                saved.version = -1 if source is None else version(source)
        return out

    def _sources(self) -> List[Tuple[_Saved, Tensor]]:
        """Each saved tensor of this step still referenced, with the tensor it was saved from, if alive."""
        found = []
        for ref in self.slots:
            saved = ref()
            source = None if saved is None or saved.source is None else saved.source()
            if saved is not None and source is not None:
                found.append((saved, source))
        return found

    def _pack(self, tensor: Tensor) -> _Saved:
        saved = _Saved(tensor)
        self.slots.append(weakref.ref(saved))
        return saved

    def _unpack(self, saved: _Saved) -> Tensor:
        if saved.tensor is None:
            self._recompute()
        assert saved.tensor is not None
        return saved.tensor

    def _check_unchanged(self) -> None:
        for (t, label), before in zip(self.inputs, self.versions):
            if version(t) != before:
                raise _changed_error(label, before, version(t))
        for t, label, before, value in self.read_only:  # values too: BatchNorm bumps no versions
            if version(t) != before:
                raise _changed_error(label, before, version(t))
            if not torch.equal(t, value):
                raise _changed(label, "its values differ from those the step read", "torch may not notice")
        labels = {id(t): label for t, label in self.inputs}
        labels.update((id(t), label) for t, label, _, _ in self.read_only)
        state = {id(t) for t, _ in self.updated}  # updated by the steps themselves, put back
        for saved, source in self._sources():  # every other tensor the step saved that is still alive
            if saved.version >= 0 and id(source) not in state:
                if version(source) != saved.version:
                    label = labels.get(
                        id(source),
                        f"a tensor of shape {tuple(source.shape)} that the step used (a captured "
                        f"tensor such as a learned rate, a buffer, or the data)",
                    )
                    raise _changed_error(label, saved.version, version(source))

    def _recompute(self) -> None:
        self._check_unchanged()
        index = 0

        def pack(tensor: Tensor) -> _Saved:
            nonlocal index
            if index >= len(self.slots):
                raise _replay_error("saved more tensors than on its first run")
            saved = self.slots[index]()
            index += 1
            if saved is not None:
                if (saved.shape, saved.dtype) != (tensor.shape, tensor.dtype):
                    raise _replay_error(
                        f"saved a {tuple(tensor.shape)} {tensor.dtype} tensor where its first run "
                        f"saved a {tuple(saved.shape)} {saved.dtype} one"
                    )
                saved.tensor = tensor.detach() if tensor.requires_grad else tensor
            return _Saved(tensor)  # the recomputation's own graph needs it too

        buffers = None if self.buffers is None else {k: t.clone() for k, t in self.buffers.items()}
        now = [t.detach().clone() for t, _ in self.updated]
        with torch.random.fork_rng(devices=[d for d in self.devices if d.type == "cuda"]):
            _set_rng_state(self.rng)
            try:
                _assign(self.updated)  # as the step found them
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _unpack_own):
                    self.fn(*self.args, buffers)
            finally:
                _assign([(t, value) for (t, _), value in zip(self.updated, now)])  # not updated twice
        if index != len(self.slots):
            raise _replay_error(f"saved {index} tensors where its first run saved {len(self.slots)}")


def _assign(pairs: Sequence[Tuple[Tensor, Tensor]]) -> None:
    # Through .data: the values go back and forth around the recomputation, and a version bump
    # would fail autograd's check in any other graph that saved the buffer (another task's pass).
    with torch.no_grad():
        for t, value in pairs:
            t.data.copy_(value)


def _unpack_own(saved: _Saved) -> Tensor:
    assert saved.tensor is not None
    return saved.tensor


def _replay_error(what: str) -> FparamsRuntimeError:
    return FparamsRuntimeError(
        f"an inner step run with checkpoint=True, recomputed for the backward pass, {what}, "
        f"so it did not run the same computation again. The loss must compute the same thing "
        f"from the same inputs (no Python state that changes between calls); pass "
        f"checkpoint=False otherwise.",
        function="adapt",
    )


def _rng_state(devices: List[torch.device]) -> List[Tuple[Optional[torch.device], Tensor]]:
    cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices if d.type == "cuda"]
    return [(None, torch.get_rng_state()), *cuda]


def _set_rng_state(states: List[Tuple[Optional[torch.device], Tensor]]) -> None:
    for device, state in states:
        if device is None:
            torch.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state, device)


def check_checkpoint(route: str) -> None:
    """Raise where activation checkpointing cannot run: under a torch.func transform."""
    if route in ("autograd", "vmap"):
        return
    raise FparamsRuntimeError(
        "checkpoint=True cannot run under a torch.func transform (grad, vjp, "
        "jacrev, jvp, or a vmap nested in another): activation checkpointing works through "
        "autograd's saved-tensor hooks, which torch.func's grad transforms refuse. Take the "
        "meta-gradient with .backward() or fparams.meta_value_and_grad (eager; both use plain "
        "autograd), under at most one vmap (fparams.map_tasks), or pass checkpoint=False."
    )


def _changed_error(label: str, before: int, now: int) -> FparamsRuntimeError:
    how = f"its version went from {before} to {now}"
    return _changed(label, how, "torch then raises its own in-place error")


def _changed(label: str, how: str, torch_does: str) -> FparamsRuntimeError:
    return FparamsRuntimeError(
        f"{label}, an input of an inner step run with checkpoint=True, was changed in "
        f"place after the step ran ({how}), so the backward pass would differentiate other "
        f"values than the step used. Change it after the backward pass, change a copy "
        f"(x.clone()), or pass checkpoint=False ({torch_does}).",
        function="adapt",
    )


def checkpointed_step(
    body: Body,
    carry: Any,
    ctx: Any,
    buffers: Optional[Mapping[str, Tensor]],
    label: Label,
    watch: Sequence[Tuple[Tensor, str]] = (),
) -> Any:
    """``body(carry, ctx, buffers)``, with its saved tensors recomputed in the backward pass.

    ``label`` names the inputs in ``(carry, ctx)`` for the error raised where one
    of them was changed in place before the recomputation; ``watch`` adds the
    tensors ``body`` reads from elsewhere (a learned rate), with their names.
    """
    if grad_route() == "vmap":
        return _under_vmap(body, carry, ctx, buffers, label, watch)
    leaves = _labelled((carry, ctx), label)
    inputs = [(t, name) for t, name in leaves if isinstance(t, Tensor)] + list(watch)
    return _Region(body, (carry, ctx), buffers, inputs).run(buffers)


def _physical(t: Tensor, level: int) -> Tensor:
    """``t`` beneath this vmap level (its version counter is the one in-place changes bump)."""
    return _ft_unwrap(t, level) if batched_at(t, level) else t


def _ft_unwrap(t: Tensor, level: int) -> Tensor:
    _ft: Any = FUNCTORCH
    value: Tensor = _ft.unwrap_batched(t, level)[0]
    return value


def _labelled(tree: Any, label: Label) -> List[Tuple[Any, str]]:
    """Every leaf of ``tree`` with its label; ``(leaf, "")`` for non-tensors."""
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [(leaf, label(_keys(path)) if isinstance(leaf, Tensor) else "") for path, leaf in paths]


def _keys(path: Sequence[Any]) -> Tuple[Any, ...]:
    # pytree's key entries (SequenceKey, MappingKey, GetAttrKey) as plain indices and names
    return tuple(getattr(k, "idx", getattr(k, "key", getattr(k, "name", k))) for k in path)


def _under_vmap(
    body: Body,
    carry: Any,
    ctx: Any,
    buffers: Optional[Mapping[str, Tensor]],
    label: Label,
    watch: Sequence[Tuple[Tensor, str]],
) -> Any:
    # Checkpoint on the physical tensors beneath the active vmap level; the
    # step runs in a vmap of its own, which exists again at recomputation.
    _ft: Any = FUNCTORCH  # the vmap route runs only where the functorch helpers were found
    interp: Any = _ft.current_interpreter()
    level, randomness = interp.level(), interp.randomness()
    flat, spec = pytree.tree_flatten((carry, ctx, buffers))
    with _ft.pop_interpreter():
        physical: List[Any] = []
        dims: List[Optional[int]] = []
        for leaf in flat:
            if isinstance(leaf, Tensor) and batched_at(leaf, level):
                value, dim = _ft.unwrap_batched(leaf, level)
                physical.append(value)
                dims.append(int(dim))
            else:
                physical.append(leaf)
                dims.append(None)
        in_dims = pytree.tree_unflatten(dims, spec)
        out_spec: List[Any] = []

        def flat_body(everything: Any) -> List[Tensor]:
            # vmap returns tensors only: the rest (None for no optimizer state) rides along
            leaves, tree = pytree.tree_flatten(body(*everything))
            out_spec[:] = [tree, [None if isinstance(x, Tensor) else (x,) for x in leaves]]
            return [x for x in leaves if isinstance(x, Tensor)]

        mapped = torch.func.vmap(flat_body, in_dims=(in_dims,), randomness=randomness)

        def run(leaves: List[Any], state: Any) -> Any:
            c, x, _ = pytree.tree_unflatten(leaves, spec)
            return mapped((c, x, state))

        # the physical buffers, with their tasks on dim 0 like everything here
        state = pytree.tree_unflatten(physical, spec)[2]
        # the step's inputs, the buffers left out (the recomputation uses its own copy)
        named = _labelled((carry, ctx), label)
        inputs = [(p, name) for p, (_, name) in zip(physical, named) if isinstance(p, Tensor)]
        inputs += [(_physical(t, level), name) for t, name in watch]
        out = _Region(run, (physical,), state, inputs).run(state)
    tree, kept = out_spec
    tensors = iter(out)
    leaves = [_ft.add_batch_dim(next(tensors), 0, level) if k is None else k[0] for k in kept]
    return pytree.tree_unflatten(leaves, tree)
