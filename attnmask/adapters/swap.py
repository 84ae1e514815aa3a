"""What every class-swapping adapter does the same way (timm, torchvision).

Such an adapter patches an attention module by swapping its class to a module-level masked
subclass (``module.__class__ = MaskedX``) and giving it ``_attnmask_*`` attributes; the
handles of the forward hooks it registers are kept on the model (:func:`keep_hook`). Undoing
is therefore the same for all of them: swap the class back, delete the ``_attnmask_*``
attributes, remove attnmask's hooks by handle. A
subclass says which host classes it masks (:attr:`ClassSwapAdapter.masked`), what a model
needs to be patchable (:meth:`~ClassSwapAdapter.check`) and what the patched modules need
besides their plan (:meth:`~ClassSwapAdapter.attach`).
"""

from __future__ import annotations

import binascii
import importlib
import sys
import threading
from typing import Any, ClassVar, Mapping, Optional, Sequence

from torch import nn

from ..report import FoundLayer
from ..spec import LayerPlan
from . import Adapter, Site


HOOK_HANDLES = "_attnmask_hook_handles"
"""Model attribute: the handles of the hooks attnmask registered for the model's patch."""


def keep_hook(model: nn.Module, handle):
    """Record ``handle`` (a hook attnmask registered while patching ``model``) so that
    :func:`remove_attnmask_hooks` removes that hook and no other. Returns ``handle``."""
    model.__dict__.setdefault(HOOK_HANDLES, []).append(handle)
    return handle


def remove_attnmask_hooks(model: nn.Module) -> None:
    """Remove the hooks patching registered on ``model`` and its modules, by their handles
    (:func:`keep_hook`). Hooks of anyone else on the same modules stay, whatever they are.
    The handles travel with the model (deepcopy, pickling), so a copy removes its own hooks."""
    for handle in model.__dict__.pop(HOOK_HANDLES, ()):
        handle.remove()


def drop_attnmask_attributes(module: nn.Module) -> None:
    """Delete the ``_attnmask_*`` attributes patching gave ``module``."""
    for attr in [k for k in module.__dict__ if k.startswith("_attnmask")]:
        del module.__dict__[attr]


_DERIVED: dict[tuple[type, type], type] = {}
_DERIVED_LOCK = threading.Lock()
_PREFIX = "AttnmaskSwapped_"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(qualified: str) -> Any:
    module, _, qualname = qualified.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def derived_masked_class(masked: type, original: type) -> type:
    """The masked class for ``original``, a user subclass of ``masked``'s host class that keeps
    the host's forward: ``masked``'s forward, ``original``'s everything else (``isinstance``
    with ``original`` stays true). Created once per pair and kept as an attribute of this
    module under a name encoding both classes, so pickling and deepcopy find it again
    (:func:`__getattr__` recreates it in a fresh process)."""
    with _DERIVED_LOCK:
        cls = _DERIVED.get((masked, original))
        if cls is None:
            code = binascii.hexlify(f"{_qualified(masked)}|{_qualified(original)}".encode()).decode()
            name = f"{_PREFIX}{original.__name__}_{code}"
            namespace = {"__module__": __name__, "__qualname__": name, "_attnmask_original": original, "_attnmask_host": original}
            cls = type(name, (masked, original), namespace)
            _DERIVED[(masked, original)] = cls
            setattr(sys.modules[__name__], name, cls)
        return cls


def __getattr__(name: str) -> type:
    """Recreate a derived masked class on unpickling, from the two classes its name encodes."""
    if name.startswith(_PREFIX) and "_" in name[len(_PREFIX):]:
        masked, _, original = binascii.unhexlify(name.rsplit("_", 1)[1]).decode().partition("|")
        return derived_masked_class(_resolve(masked), _resolve(original))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_REWRAPPED: dict[tuple[type, type], type] = {}


def rewrapped(wrapper: type, inner: type, replacement: type) -> type:
    """``wrapper``, a class some library derived at run time from ``inner``, rebuilt around
    ``replacement`` instead (``FSDPMaskedAttention(FSDPModule, MaskedAttention)`` ->
    ``FSDPAttention(FSDPModule, Attention)``): same namespace, ``inner`` replaced in its bases.
    Created once per pair, so patching and unpatching again makes no new classes."""
    with _DERIVED_LOCK:
        cls = _REWRAPPED.get((wrapper, replacement))
        if cls is None:
            bases = tuple(replacement if base is inner else base for base in wrapper.__bases__)
            namespace = {k: v for k, v in vars(wrapper).items() if k not in ("__dict__", "__weakref__")}
            name = wrapper.__name__.replace(inner.__name__, replacement.__name__)
            cls = type(name, bases, {**namespace, "__qualname__": name})
            _REWRAPPED[(wrapper, replacement)] = cls
        return cls


class ClassSwapAdapter(Adapter):
    """Base of the adapters that swap attention modules' classes to masked subclasses."""

    name: ClassVar[str]
    masked: ClassVar[Mapping[type, type]]
    """Host attention class -> its masked subclass. A user subclass of a host class is patched
    when it keeps the host's ``forward`` (its class becomes a derived masked class, see
    :func:`derived_masked_class`) and refused by name when it overrides it."""

    @classmethod
    def hosts(cls) -> dict[type, type]:
        """Masked subclass -> host class."""
        return {masked: host for host, masked in cls.masked.items()}

    def original_class(self, cls: type) -> Optional[type]:
        """The class a patched module had before (``None`` if ``cls`` is not a masked class of
        this adapter). A wrapper class made at run time around a masked class (FSDP2's
        ``fully_shard`` swaps a module's class to ``FSDP<Class>(FSDPModule, Class)``) gives the
        same wrapper around the original class (:func:`rewrapped`), so the module stays wrapped."""
        original = cls.__dict__.get("_attnmask_original")
        if original is not None and any(base in self.hosts() for base in cls.__bases__):
            return original
        if cls in self.hosts():
            return self.hosts()[cls]
        for base in cls.__bases__:
            inner = self.original_class(base) if base is not object else None
            if inner is not None:
                return rewrapped(cls, base, inner)
        return None

    def host_of(self, cls: type) -> Optional[type]:
        """The host class ``cls`` is or derives from (nearest in its MRO), ``None`` if none.
        Masked classes (attnmask's own, of any adapter) have no host here."""
        if any(c.__module__.startswith("attnmask.adapters.") for c in cls.__mro__):
            return None
        return next((c for c in cls.__mro__ if c in self.masked), None)

    def trusted(self, cls: type) -> bool:
        """Whether modules of ``cls`` (a host class or a subclass of one) can be patched: the
        host itself, or a subclass that keeps the host's ``forward`` (the masked forward
        repeats the host's; an overridden one would be silently replaced)."""
        host = self.host_of(cls)
        return host is not None and (cls is host or getattr(cls, "forward", None) is getattr(host, "forward", None))

    def candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every module of a host class, a subclass of one, or one this
        adapter patched, in order (:meth:`attention_modules` keeps those it can patch)."""
        return [(n, m) for n, m in model.named_modules() if self.original_class(type(m)) is not None or self.host_of(type(m)) is not None]

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every host (or already masked) attention module, and of every
        subclass of a host that keeps its forward, in order."""
        return [(n, m) for n, m in self.candidates(model) if self.original_class(type(m)) is not None or self.trusted(type(m))]

    def untrusted(self, model: nn.Module) -> list[tuple[str, nn.Module, type]]:
        """``(name, module, host)`` of every subclass of a host class that overrides ``forward``."""
        return [
            (n, m, self.host_of(type(m)))  # type: ignore[misc]
            for n, m in self.candidates(model)
            if self.original_class(type(m)) is None and not self.trusted(type(m))
        ]

    def refusal(self, cls: type, host: type) -> str:
        """Why a subclass of ``host`` that overrides ``forward`` is not patched."""
        return (
            f"{cls.__module__}.{cls.__qualname__} subclasses {host.__module__}.{host.__qualname__} but overrides "
            f"forward: the masked layer runs {host.__qualname__}'s attention and would silently drop what the "
            "override does"
        )

    def matches(self, model: nn.Module) -> bool:
        return bool(self.attention_modules(model))

    def check(self, model: nn.Module) -> None:
        """Raise ``TypeError`` if ``model`` has the attention layers but cannot be patched."""

    def sites(self, model: nn.Module) -> list[Site]:
        self.check(model)
        refused = self.untrusted(model)
        if refused:
            names = ", ".join(n for n, _, _ in refused[:3]) + (", ..." if len(refused) > 3 else "")
            _, module, host = refused[0]
            raise TypeError(
                f"attnmask cannot patch {len(refused)} attention layer(s) of {type(model).__name__} ({names}): "
                f"{self.refusal(type(module), host)}. Leaving them global would make heads=... mask only some layers. "
                f"Keep {host.__qualname__}.forward in the subclass (override other methods), or restore "
                f"{host.__qualname__} on those layers before attnmask.apply"
            )
        return [
            Site(name=name, layer=i, num_heads=int(m.num_heads), module=m)
            for i, (name, m) in enumerate(self.attention_modules(model))
        ]

    def findings(self, model: nn.Module, example=None) -> list[FoundLayer]:
        """The patchable layers and, refused with the reason, subclasses that override forward."""
        refused = {n: (m, host) for n, m, host in self.untrusted(model)}
        if not refused:
            return super().findings(model, example)
        grid = self.grid(model)
        geometry = f"{grid[0]}x{grid[1]} grid" if grid else ""
        found = []
        for name, module in self.candidates(model):
            heads = int(getattr(module, "num_heads", 0) or 0)
            if name in refused:
                found.append(FoundLayer(name, type(module).__name__, heads, "refused", self.refusal(type(module), refused[name][1])))
            else:
                kind = (self.original_class(type(module)) or type(module)).__name__
                found.append(FoundLayer(name, kind, heads, "patchable", geometry=geometry))
        return found

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        for site, plan in zip(sites, plans):
            module = site.module
            original = self.original_class(type(module)) or type(module)
            host = self.host_of(original)
            masked = self.masked[host]  # type: ignore[index]
            module.__class__ = masked if original is host else derived_masked_class(masked, original)
            module._attnmask_plan = plan
        if sites:
            self.attach(model, sites)

    def attach(self, model: nn.Module, sites: Sequence[Site]) -> None:
        """Give the patched modules what they need besides their plan (``_attnmask_*``
        attributes, forward hooks); nothing by default."""

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        for name in names:
            module = model.get_submodule(name)
            original = self.original_class(type(module))
            if original is not None:
                module.__class__ = original
            drop_attnmask_attributes(module)
        remove_attnmask_hooks(model)

    def patched_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention modules currently patched."""
        return [m for _, m in self.attention_modules(model) if self.original_class(type(m)) is not None]

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        """The patch grid of the model's configured input (``patch_embed.grid_size``)."""
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return (int(grid[0]), int(grid[1])) if grid is not None else None
