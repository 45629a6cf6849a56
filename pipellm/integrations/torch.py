"""PyTorch: run a model whose weights stay on the host, loading each module's weights
through a :class:`~pipellm.Pipeline` right before the module runs, as accelerate's
offloading hooks and DeepSpeed's parameter offload do (forward, and backward for
training with offloaded weights, e.g. LoRA fine-tuning).

Every parameter and buffer is moved once into library-owned host memory (a copy), so
the ``pipellm`` mode can speculate on it safely: a later write to a weight (an optimizer
step, ``load_state_dict``) faults once on the write-protected pages and is never sent
stale. Each becomes a region named after the tensor (``"0.weight"``, ``"layers.3.mlp.fc1.bias"``)
of kind ``"weight"``, so ``offloaded.record(path)`` writes traces of real models.

On the ``emulated`` device the module still computes on the host tensors (that device
models a GPU; it runs no PyTorch kernels): what the integration exercises is the
traffic, its order, and the channel.

>>> import torch, pipellm
>>> from pipellm.integrations.torch import offload
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> with pipellm.Pipeline(device="emulated", mode="cc") as pipe:
...     with offload(model, pipe) as offloaded:
...         y = model(torch.ones(1, 8))
...         offloaded.stats()["loads"]
4
"""

from __future__ import annotations

from time import perf_counter

import numpy as np

from ..errors import ArgumentError, ArgumentTypeError
from ..hostmem import empty
from ..pipeline import Pipeline

try:
    import torch
except ImportError:  # an optional extra: pip install 'pipellm[torch]'
    torch = None

__all__ = ["OffloadedModule", "offload"]


def _require_torch():
    if torch is None:
        raise ImportError("pipellm.integrations.torch needs PyTorch: pip install 'pipellm[torch]'")


class OffloadedModule:
    """The hooks and regions of one offloaded module (from :func:`offload`).

    ``regions`` maps each tensor's qualified name to its region. ``close()`` (or leaving
    the ``with`` block) removes the hooks and unregisters the regions; the tensors keep
    their (library-owned) memory and values.
    """

    def __init__(self, module, pipeline: Pipeline, regions: dict, owners: dict, *, backward: bool,
                 sync: bool, compute: str | None):
        self.module, self.pipeline, self.regions = module, pipeline, regions
        self.sync, self.compute = sync, compute
        self.loads = 0
        self.load_bytes = 0
        self._started: dict[int, float] = {}
        self._handles = []
        for submodule, names in owners.items():
            mine = [regions[n] for n in names]
            self._handles.append(submodule.register_forward_pre_hook(self._loader(mine, submodule)))
            if compute == "measured":
                self._handles.append(submodule.register_forward_hook(self._timer(submodule)))
            if backward:
                self._handles.append(submodule.register_forward_hook(self._backward_loader(mine)))
        self.closed = False

    def _load(self, regions: list) -> None:
        for region in regions:
            self.pipeline.to_device(region)
            self.loads += 1
            self.load_bytes += region.nbytes
        if self.sync:  # the module's compute needs its weights: wait for them (accelerate does)
            self.pipeline.synchronize()

    def _loader(self, regions: list, timed):
        def hook(*_):
            if self.closed:
                return None
            self._load(regions)
            if self.compute == "measured":
                self._started[id(timed)] = perf_counter()
            return None
        return hook

    def _backward_loader(self, regions: list):
        """A forward hook that hooks the module's outputs: the first gradient computed for
        one of them (the module's backward is next) loads its weights again. (Module
        full-backward hooks would break modules followed by in-place ops.)"""
        def hook(module, args, output):
            outputs = [t for t in _tensors(output) if t.requires_grad]
            if self.closed or not outputs or not torch.is_grad_enabled():
                return None
            pending = [True]

            def on_grad(grad):
                if pending[0] and not self.closed:
                    pending[0] = False
                    self._load(regions)
                return None

            for t in outputs:
                t.register_hook(on_grad)
            return None
        return hook

    def _timer(self, submodule):
        def hook(*_):
            start = self._started.pop(id(submodule), None)
            if start is not None and not self.closed:
                self.pipeline.compute((perf_counter() - start) * 1e6)
            return None
        return hook

    def record(self, path, *, workload: str = "", meta: dict | None = None):
        """Record the pipeline's traffic while the module runs (a version-1 trace): the
        pipeline's recorder, with this module's tensors as ``weight`` regions.
        ``with offloaded.record("run.jsonl.gz"): model(x)``."""
        meta = {"source": "pipellm.integrations.torch", "module": type(self.module).__name__,
                "tensors": len(self.regions), **(meta or {})}
        return self.pipeline.record(path, workload=workload or type(self.module).__name__, meta=meta)

    def stats(self) -> dict:
        """Loads issued by the hooks, the bytes they moved, and how many tensors no hook
        has loaded yet (after a pass: their module never ran; see ``blocks``)."""
        return {"loads": self.loads, "load_bytes": self.load_bytes, "tensors": len(self.regions),
                "never_loaded": sum(r.device_buffer is None for r in self.regions.values())}

    def close(self) -> None:
        """Remove the hooks and unregister the regions (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _unregister(self.pipeline, self.regions.values())

    def __enter__(self) -> OffloadedModule:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<OffloadedModule {type(self.module).__name__}: {len(self.regions)} tensors{' closed' if self.closed else ''}>"


def _tensors(value):
    """The tensors in a module's output (a tensor, or tuples, lists and dicts of them)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _unregister(pipeline: Pipeline, regions) -> None:
    """Unregister what is still registered of ``regions`` (nothing once the pipeline closed)."""
    if not pipeline.closed:
        for region in regions:
            if region.registered:
                pipeline.unregister(region)


def _host_copy(tensor):
    """``tensor``'s values in library-owned host memory, as a tensor of the same dtype and shape."""
    host = empty(tensor.numel() * tensor.element_size(), np.uint8)
    view = torch.from_numpy(host).view(tensor.dtype).view(tensor.shape)
    view.copy_(tensor.detach())
    return host, view


def offload(module, pipeline: Pipeline, *, prefix: str = "", blocks: tuple = (), backward: bool = True,
            sync: bool = True, compute: str | None = None) -> OffloadedModule:
    """Offload ``module``'s parameters and buffers: each module loads its own tensors
    through ``pipeline`` before it runs (``backward=True``: before its backward pass too).

    ``blocks``: module classes that load their whole subtree at once, as accelerate's
    ``no_split_module_classes`` do. Needed where a module's fused fast path reads its
    children's weights without calling them (``torch.nn.TransformerEncoderLayer`` in
    inference): ``stats()["never_loaded"]`` shows tensors no hook has loaded.

    ``sync``: wait for the loads before the module computes (synchronous offload, as
    accelerate does); ``compute="measured"``: tell the pipeline each module's measured
    run time as device compute (so recorded traces carry it); ``prefix`` goes before
    every region name (to offload several models into one pipeline).

    Tensors must be on the CPU. A tensor shared by several modules (tied embeddings) is
    one region, loaded by each module that uses it.
    """
    _require_torch()
    if not isinstance(module, torch.nn.Module):
        raise ArgumentTypeError(f"offload() takes a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(pipeline, Pipeline):
        raise ArgumentTypeError(f"offload() needs a pipellm.Pipeline, got {type(pipeline).__name__}")
    if pipeline.device.kind != "emulated":
        raise ArgumentError(f"offload() runs modules on the host tensors, which only the emulated device "
                            f"pairs with; the {pipeline.device.kind!r} device is not supported by it yet")
    if compute not in (None, "measured"):
        raise ArgumentError(f"compute must be None or 'measured', got {compute!r}")
    blocks = tuple(blocks) if isinstance(blocks, (tuple, list)) else (blocks,)
    if not all(isinstance(b, type) and issubclass(b, torch.nn.Module) for b in blocks):
        raise ArgumentTypeError(f"blocks must be torch.nn.Module classes, got {blocks!r}")
    tensors = {}   # id -> (qualified name, owning module, attribute name, tensor)
    owners: dict = {}  # module whose hooks load them -> tensor names
    block_roots: dict = {}  # name -> module, for modules of the blocks' classes (outermost)
    for mod_name, submodule in module.named_modules():
        owner = next((m for n, m in block_roots.items() if mod_name.startswith(n + ".")), None)
        if owner is None and blocks and isinstance(submodule, blocks):
            owner = block_roots[mod_name] = submodule
        owner = owner if owner is not None else submodule
        local = [(n, t, False) for n, t in submodule.named_parameters(recurse=False)]
        local += [(n, t, True) for n, t in submodule.named_buffers(recurse=False) if t is not None]
        for attr, tensor, is_buffer in local:
            if tensor.device.type != "cpu":
                raise ArgumentError(f"tensor {mod_name + '.' + attr if mod_name else attr!r} is on "
                                    f"{tensor.device}; offload() takes modules whose tensors are on the CPU")
            if tensor.numel() == 0:
                continue
            name = prefix + (f"{mod_name}.{attr}" if mod_name else attr)
            first = tensors.setdefault(id(tensor), (name, submodule, attr, tensor, is_buffer))
            owners.setdefault(owner, []).append(first[0])
    # everything checked: now move the tensors (nothing is changed if a check failed)
    regions = {}
    try:
        for name, submodule, attr, tensor, is_buffer in tensors.values():
            host, view = _host_copy(tensor)
            if is_buffer:
                tensor.data = view
            else:
                with torch.no_grad():
                    tensor.data = view
            regions[name] = pipeline.register(host, name=name, kind="weight")
    except BaseException:
        _unregister(pipeline, regions.values())
        raise
    return OffloadedModule(module, pipeline, regions, owners, backward=backward, sync=sync, compute=compute)
