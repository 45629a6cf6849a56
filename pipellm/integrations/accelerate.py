"""accelerate: offload a Hugging Face model through a :class:`~pipellm.Pipeline`, with
accelerate's own hooks.

accelerate offloads a module by turning its weights into meta tensors and installing an
``AlignDevicesHook``: before each forward it reads every weight of the module from a
*weights map* (a ``Mapping`` from names to tensors) and puts it on the execution device;
after the forward it drops them. :class:`WeightsMap` is that mapping backed by pipellm
regions: reading a name sends the tensor through the pipeline and gives back the
device's copy. So each module's weights move exactly when accelerate moves them, in the
order the model runs, and in ``pipellm`` mode the predictor encrypts the next ones ahead.
:func:`cpu_offload` and :func:`dispatch_model` are accelerate's functions of the same
names with a pipeline: they install accelerate's hooks with a :class:`WeightsMap`.

On the ``emulated`` device the modules run on the CPU, on the device's memory itself
(:meth:`~pipellm.devices.emulated.EmulatedDevice.memory`): the model computes on the
bytes the device's copy engine verified and decrypted, so the same outputs in every mode
show that every weight arrived intact.

>>> import torch, pipellm
>>> from pipellm.integrations.accelerate import cpu_offload
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> expected = model(torch.ones(1, 8))
>>> with pipellm.Pipeline(device="emulated", mode="cc") as pipe:
...     weights = cpu_offload(model, pipe)
...     y = model(torch.ones(1, 8))
...     bool(torch.equal(y, expected)), weights.stats()["loads"]
(True, 4)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from time import perf_counter, thread_time

from ..errors import ArgumentError, ArgumentTypeError
from ..pipeline import Pipeline
from .torch import _host_copy, _unregister

try:
    import torch
except ImportError:  # an optional extra: pip install 'pipellm[accelerate]'
    torch = None
try:
    import accelerate
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import find_tied_parameters, retie_parameters, set_module_tensor_to_device
except ImportError:
    accelerate = None

__all__ = ["WeightsMap", "cpu_offload", "dispatch_model", "infer_device_map"]

#: the execution device of modules on the emulated device (see the module docstring)
EXECUTION_DEVICE = "cpu"
#: what a device map says for modules whose weights stay on the device
ON_DEVICE = "device"
_KEEP = "keep"  # (cpu_offload's map: tensors left as they are)


def _require() -> None:
    if torch is None or accelerate is None:
        raise ImportError("pipellm.integrations.accelerate needs PyTorch and accelerate: "
                          "pip install 'pipellm[accelerate]'")


def _check_pipeline(pipeline, who: str) -> None:
    if not isinstance(pipeline, Pipeline):
        raise ArgumentTypeError(f"{who} needs a pipellm.Pipeline, got {type(pipeline).__name__}")
    if pipeline.device.kind != "emulated":
        raise ArgumentError(f"{who} runs modules on the device's memory from the CPU, which only the "
                            f"emulated device offers; the {pipeline.device.kind!r} device is not supported yet")


class WeightsMap(Mapping):
    """accelerate's weights map, backed by pipellm regions (see the module docstring).

    ``tensors`` maps names (a model's ``state_dict()`` names) to CPU tensors. Each distinct
    tensor is copied once into library-owned host memory and becomes a region of kind
    ``"weight"`` named ``prefix + name`` (names of one tied tensor share its region).
    ``map[name]`` sends that region to the device, waits for it, and returns the device's
    copy as a tensor of the original dtype and shape (the same tensor object each time).

    To change a weight, write into :meth:`host` in place: the memory is write-tracked, so
    the next load sends the new values, never bytes encrypted before the write.

    >>> import torch, pipellm
    >>> with pipellm.Pipeline(device="emulated", mode="plain") as pipe:
    ...     weights = WeightsMap(pipe, {"w": torch.arange(4.0), "v": torch.ones(2, 2)})
    ...     weights["w"].tolist(), sorted(weights), weights.stats()["loads"]
    ([0.0, 1.0, 2.0, 3.0], ['v', 'w'], 1)
    """

    def __init__(self, pipeline: Pipeline, tensors: Mapping, *, prefix: str = ""):
        _require()
        _check_pipeline(pipeline, "WeightsMap")
        if not isinstance(tensors, Mapping):
            raise ArgumentTypeError(f"tensors must be a Mapping of names to tensors, got {type(tensors).__name__}")
        if not isinstance(prefix, str):
            raise ArgumentTypeError(f"prefix must be a str, got {type(prefix).__name__}")
        shared: dict[tuple, str] = {}  # where a tensor's values live -> the first name of it
        self._key: dict[str, str] = {}   # name -> its region's name
        for name, tensor in tensors.items():
            if not isinstance(name, str):
                raise ArgumentTypeError(f"tensor names must be str, got {type(name).__name__}")
            if not torch.is_tensor(tensor):
                raise ArgumentTypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
            if tensor.device.type != "cpu":
                raise ArgumentError(f"{name!r} is on {tensor.device}; a WeightsMap takes CPU tensors")
            if tensor.numel() == 0:
                raise ArgumentError(f"{name!r} is empty; a WeightsMap takes tensors with values")
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                     tuple(tensor.stride()), tensor.dtype)
            self._key[name] = shared.setdefault(where, prefix + name)
        # everything checked: now copy and register (nothing stays registered if one fails)
        self.pipeline = pipeline
        self._regions, self._hosts, self._views = {}, {}, {}
        self._dtypes: dict[str, tuple] = {}
        try:
            for name, key in self._key.items():
                if key in self._regions:
                    continue
                tensor = tensors[name]
                host, view = _host_copy(tensor)
                self._regions[key] = pipeline.register(host, name=key, kind="weight")
                self._hosts[key] = view
                self._dtypes[key] = (tensor.dtype, tuple(tensor.shape))
        except BaseException:
            self.close()
            raise
        self.loads = 0            # reads of a name
        self.transfers = 0        # of them, sent through the pipeline
        self.transfer_bytes = 0
        self.reused = 0           # of them, the tensor just sent, unchanged (see __getitem__)
        self.load_s = 0.0         # seconds in transfers, on the device's clock (see stats)
        self.load_cpu_s = 0.0     # the loading thread's CPU seconds in them
        self._last, self._last_token = None, None
        self._recording, self._ran = False, None  # see record()

    def _region_key(self, name: str) -> str:
        key = self._key.get(name)
        if key is None:
            raise KeyError(name)
        return key

    def __getitem__(self, name: str):
        key = self._region_key(name)
        if self._closed():
            raise ArgumentError(f"this WeightsMap is closed; {name!r} can no longer be loaded")
        region = self._regions[key]
        self.loads += 1
        cached = self._views.get(key)
        if cached is not None and self._last == (key, cached[0]) and self._last_token is not None \
                and region.unchanged_since(self._last_token):
            # the tensor just loaded, unchanged, read again (a tied weight: the head ends a
            # forward, the embedding starts the next): its device copy is current, as
            # accelerate's tied_params_map keeps it on the GPU
            self.reused += 1
            return cached[1]
        token = region.token()
        device = self.pipeline.device
        start, frozen, cpu = perf_counter(), device.frozen_s(), thread_time()
        module = name.rpartition(".")[0]
        if self._recording and self._ran is not None and module != self._ran[0]:
            # the model ran since the last module's loads: its time, as device compute
            self.pipeline.compute((start - self._ran[1]) * 1e6)
        buf = self.pipeline.to_device(region)
        self.pipeline.synchronize()  # the module computes next (accelerate copies synchronously)
        end = perf_counter()
        self.load_s += end - start - (device.frozen_s() - frozen)
        self.load_cpu_s += thread_time() - cpu
        self._ran = (module, end)
        self.transfers += 1
        self.transfer_bytes += region.nbytes
        if cached is None or cached[0] is not buf:
            dtype, shape = self._dtypes[key]
            with warnings.catch_warnings():  # read-only device memory: the model only reads it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                view = torch.from_numpy(self.pipeline.device.memory(buf)).view(dtype).view(shape)
            cached = self._views[key] = (buf, view)
        self._last, self._last_token = (key, buf), token
        return cached[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._key)

    def __len__(self) -> int:
        return len(self._key)

    def __contains__(self, name) -> bool:
        return name in self._key

    def host(self, name: str):
        """The host copy of ``name`` (library-owned, write-tracked): write into it in place
        (under ``torch.no_grad()``) to change the weight."""
        return self._hosts[self._region_key(name)]

    def region(self, name: str):
        """The :class:`~pipellm.pipeline.region.Region` that carries ``name``."""
        return self._regions[self._region_key(name)]

    @contextmanager
    def record(self, path, *, workload: str = "", meta: dict | None = None):
        """Record the model's traffic while it runs inside the block (a version-1 trace:
        the pipeline's recorder, these tensors as ``weight`` regions), with the time the
        model ran between one module's loads and the next's as device compute, so replays
        of the trace leave the predictor and the workers the time the model gave them.
        (That compute is told to the pipeline, so the recorded run waits for it too: a
        run to record, not to time.)"""
        meta = {"source": "pipellm.integrations.accelerate", "tensors": len(self._regions), **(meta or {})}
        with self.pipeline.record(path, workload=workload or "accelerate", meta=meta):
            self._recording, self._ran = True, None
            try:
                yield
            finally:
                self._recording, self._ran = False, None

    def stats(self) -> dict:
        """Loads (reads of a name); of them, transfers through the pipeline (their bytes,
        and ``load_s``: the seconds the model waited for them, on the device's clock, so
        the emulated device's own CPU work beyond its model is left out; ``load_cpu_s``:
        the loading thread's CPU seconds in them) and reuses of the tensor just sent;
        names; regions (distinct tensors)."""
        return {"loads": self.loads, "transfers": self.transfers, "transfer_bytes": self.transfer_bytes,
                "load_s": self.load_s, "load_cpu_s": self.load_cpu_s, "reused": self.reused, "names": len(self._key),
                "regions": len(self._regions)}

    def _closed(self) -> bool:
        return not self._regions or self.pipeline.closed

    def close(self) -> None:
        """Unregister the regions (idempotent). Modules still hooked can't load any more."""
        regions, self._regions = self._regions, {}
        self._views, self._last = {}, None
        _unregister(self.pipeline, regions.values())

    def __enter__(self) -> WeightsMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<WeightsMap {len(self._key)} names, {len(self._regions)} regions>"


def _offloaded_tensors(model, offload_buffers: bool) -> dict:
    """What accelerate's hooks read from the weights map: parameters, and persistent
    buffers with ``offload_buffers`` (the others stay where they are)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    if offload_buffers:
        persistent = set(model.state_dict(keep_vars=True))
        tensors.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if n in persistent)
    return tensors


def _check_model(model, who: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"{who} takes a torch.nn.Module, got {type(model).__name__}")
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):  # (the model's own too)
        raise ArgumentError(f"{who}: the model already has accelerate hooks; remove them first "
                            f"(accelerate.hooks.remove_hook_from_submodules)")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "cpu":
            raise ArgumentError(f"{who}: {name!r} is on {tensor.device}; build or load the model on the CPU")


def cpu_offload(model, pipeline: Pipeline, *, keep=(), offload_buffers: bool = False,
                preload_module_classes: list[str] | None = None) -> WeightsMap:
    """accelerate's ``cpu_offload`` through ``pipeline``: every module's weights stay in
    host memory and are loaded through the pipeline right before the module runs.
    Returns the :class:`WeightsMap` (its ``stats()``, ``host(name)`` to change a weight).

    ``keep``: names of parameters left as they are, not offloaded (a module's tensors are
    kept all or none): what an optimizer updates, such as LoRA adapters added after
    offloading (accelerate's hooks rebuild offloaded parameters at every forward).
    ``offload_buffers`` and ``preload_module_classes`` (modules that load their whole
    subtree at once, for blocks that read their children's weights without calling
    them) are accelerate's. Remove the hooks with
    ``accelerate.hooks.remove_hook_from_submodules(model)``; offloaded weights are then on
    the meta device (as with accelerate).
    """
    _require()
    _check_pipeline(pipeline, "cpu_offload()")
    _check_model(model, "cpu_offload()")
    keep = set(keep)
    unknown = keep - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if unknown:
        raise ArgumentError(f"cpu_offload(): keep names parameters the model does not have: {sorted(unknown)[:5]}")
    places = {}
    for name, module in model.named_modules():
        direct = [(name + "." if name else "") + n for n, _ in module.named_parameters(recurse=False)]
        kept = [n for n in direct if n in keep]
        if kept and len(kept) < len(direct):
            raise ArgumentError(f"cpu_offload(): module {name!r} would have {kept} kept and the rest of its "
                                f"parameters offloaded; keep all of a module's parameters or none")
        if direct or any(True for _ in module.buffers(recurse=False)):
            places[name] = _KEEP if kept else "cpu"
    return _dispatch(model, pipeline, places, offload_buffers, preload_module_classes)


def infer_device_map(model, device_bytes: int, *, no_split_module_classes: list[str] | None = None) -> dict:
    """A device map for a GPU of ``device_bytes``, by the rule of accelerate's
    ``infer_auto_device_map`` (which only maps GPUs this machine has): modules in order
    stay on the device (``"device"``) while they fit; one that does not is split into its
    children unless its class is in ``no_split_module_classes``; from the first that
    neither fits nor splits on, everything is offloaded (``"cpu"``). Sizes from
    accelerate's ``compute_module_sizes``; tied weights count once.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    >>> infer_device_map(model, 300)
    {'0': 'device', '1': 'cpu'}
    """
    _require()
    from accelerate.utils import compute_module_sizes
    if isinstance(device_bytes, bool) or not isinstance(device_bytes, int) or device_bytes < 0:
        raise ArgumentError(f"device_bytes must be an int >= 0, got {device_bytes!r}")
    no_split = set(no_split_module_classes or ())
    sizes = compute_module_sizes(model)
    seen: set[int] = set()  # tensors already counted (tied weights)

    def entries(prefix: str, module) -> list:
        own = [(prefix + n, None, t) for n, t in module.named_parameters(recurse=False)]
        return own + [(prefix + n, m, None) for n, m in module.named_children()]

    device_map, left, offloading = {}, device_bytes, False
    todo = entries("", model)
    while todo:
        name, module, tensor = todo.pop(0)
        if tensor is not None:
            tensors = [tensor]
            nbytes = tensor.numel() * tensor.element_size()
        else:  # accelerate's size of the module, less what tied weights counted already
            tensors = [*module.parameters(), *module.buffers()]
            fresh = [t for t in tensors if id(t) not in seen]
            nbytes = sizes[name] if len(fresh) == len(tensors) else sum(t.numel() * t.element_size() for t in fresh)
        if not offloading and nbytes <= left:
            device_map[name] = ON_DEVICE
            left -= nbytes
        elif not offloading and module is not None and list(module.children()) \
                and type(module).__name__ not in no_split:
            todo[:0] = entries(name + ".", module)
            continue
        else:
            offloading = True
            device_map[name] = "cpu"
        seen.update(id(t) for t in tensors)
    if all(where == ON_DEVICE for where in device_map.values()):
        return {"": ON_DEVICE}
    return device_map


def dispatch_model(model, pipeline: Pipeline, device_map: dict, *, offload_buffers: bool = False,
                   preload_module_classes: list[str] | None = None) -> WeightsMap:
    """accelerate's ``dispatch_model`` through ``pipeline``: modules mapped to ``"cpu"``
    are offloaded (loaded through the pipeline before each forward, dropped after), those
    mapped to ``"device"`` (or a GPU index, as accelerate's maps say) are loaded through it
    once, now, and stay. ``device_map`` as :func:`infer_device_map` or accelerate's
    ``infer_auto_device_map`` gives it: module names (``""`` for the whole model) to
    places; every parameter must fall under one of them. Returns the :class:`WeightsMap`.

    Tied weights are one region, and stay tied where accelerate keeps them so
    (``find_tied_parameters`` / ``retie_parameters``).
    """
    _require()
    _check_pipeline(pipeline, "dispatch_model()")
    _check_model(model, "dispatch_model()")
    if not isinstance(device_map, Mapping) or not device_map:
        raise ArgumentTypeError(f"device_map must be a non-empty dict of module names to 'cpu' or 'device', "
                                f"got {device_map!r}")
    places = {}
    for name, where in device_map.items():
        if where == "disk":
            raise ArgumentError(f"device_map sends {name!r} to disk; pipellm offloads to host memory ('cpu')")
        if where != "cpu" and where != ON_DEVICE and not (isinstance(where, int) and not isinstance(where, bool)) \
                and not (isinstance(where, str) and where.startswith("cuda")):
            raise ArgumentError(f"device_map[{name!r}] is {where!r}; expected 'cpu' (offloaded) or 'device' "
                                f"(or a GPU index) for weights that stay on the device")
        places[name] = "cpu" if where == "cpu" else ON_DEVICE
    modules = dict(model.named_modules())
    unknown = [n for n in places if n not in modules]
    if unknown:
        raise ArgumentError(f"device_map names modules the model does not have: {unknown[:5]}")
    return _dispatch(model, pipeline, places, offload_buffers, preload_module_classes)


def _dispatch(model, pipeline, places: dict, offload_buffers: bool, preload_module_classes) -> WeightsMap:
    """Install accelerate's hooks by ``places`` (module name -> "cpu", "device" or kept):
    the weights map of what is not kept, resident weights loaded once now."""
    def place(tensor_name: str) -> str | None:
        parts = tensor_name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            where = places.get(".".join(parts[:cut]))
            if where is not None:
                return where
        return None
    tensors = _offloaded_tensors(model, offload_buffers)
    where = {n: place(n) for n in tensors}
    uncovered = [n for n, p in where.items() if p is None]
    if uncovered:
        raise ArgumentError(f"device_map places no module over {uncovered[:5]}")
    tied = find_tied_parameters(model)
    weights = WeightsMap(pipeline, {n: t for n, t in tensors.items() if where[n] != _KEEP})
    try:
        tied_params_map = {model.get_parameter(n).data_ptr(): {} for group in tied for n in group}
        # weights that stay: loaded through the pipeline once, the module keeps the device's copy
        for name, p in where.items():
            if p == ON_DEVICE:
                set_module_tensor_to_device(model, name, EXECUTION_DEVICE, value=weights[name])
        execution = torch.device(EXECUTION_DEVICE)
        attach_align_device_hook_on_blocks(
            model, execution_device=dict.fromkeys([*places, ""], execution),
            offload={n: p == "cpu" for n, p in places.items()}, weights_map=weights,
            offload_buffers=offload_buffers, preload_module_classes=preload_module_classes,
            tied_params_map=tied_params_map)
        retie_parameters(model, tied)
    except BaseException:
        weights.close()
        raise
    return weights
