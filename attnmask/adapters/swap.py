"""What every class-swapping adapter does the same way (timm, torchvision).

Such an adapter patches an attention module by swapping its class to a module-level masked
subclass (``module.__class__ = MaskedX``) and giving it ``_attnmask_*`` attributes; forward
hooks it registers are attnmask objects. Undoing is therefore the same for all of them:
swap the class back, delete the ``_attnmask_*`` attributes, drop attnmask's hooks. A
subclass says which host classes it masks (:attr:`ClassSwapAdapter.masked`), what a model
needs to be patchable (:meth:`~ClassSwapAdapter.check`) and what the patched modules need
besides their plan (:meth:`~ClassSwapAdapter.attach`).
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Optional, Sequence

from torch import nn

from ..spec import LayerPlan
from . import Adapter, Site


def is_attnmask_hook(hook) -> bool:
    """Whether a forward (pre-)hook was registered by attnmask (an attnmask object or its method)."""
    owner = getattr(hook, "__self__", hook)
    return type(owner).__module__.startswith("attnmask.")


def remove_attnmask_hooks(model: nn.Module) -> None:
    """Drop every forward hook and pre-hook attnmask registered anywhere in ``model``."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if is_attnmask_hook(hook)]:
                del hooks[key]
                for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(module, extra, {}).pop(key, None)


def drop_attnmask_attributes(module: nn.Module) -> None:
    """Delete the ``_attnmask_*`` attributes patching gave ``module``."""
    for attr in [k for k in module.__dict__ if k.startswith("_attnmask")]:
        del module.__dict__[attr]


class ClassSwapAdapter(Adapter):
    """Base of the adapters that swap attention modules' classes to masked subclasses."""

    name: ClassVar[str]
    masked: ClassVar[Mapping[type, type]]
    """Host attention class -> its masked subclass (exact types: subclasses are not matched)."""

    @classmethod
    def hosts(cls) -> dict[type, type]:
        """Masked subclass -> host class."""
        return {masked: host for host, masked in cls.masked.items()}

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every host (or already masked) attention module, in order."""
        hosts = self.hosts()
        return [(n, m) for n, m in model.named_modules() if type(m) in self.masked or type(m) in hosts]

    def matches(self, model: nn.Module) -> bool:
        return bool(self.attention_modules(model))

    def check(self, model: nn.Module) -> None:
        """Raise ``TypeError`` if ``model`` has the attention layers but cannot be patched."""

    def sites(self, model: nn.Module) -> list[Site]:
        self.check(model)
        return [
            Site(name=name, layer=i, num_heads=int(m.num_heads), module=m)
            for i, (name, m) in enumerate(self.attention_modules(model))
        ]

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        hosts = self.hosts()
        for site, plan in zip(sites, plans):
            module = site.module
            module.__class__ = self.masked[hosts.get(type(module), type(module))]
            module._attnmask_plan = plan
        if sites:
            self.attach(model, sites)

    def attach(self, model: nn.Module, sites: Sequence[Site]) -> None:
        """Give the patched modules what they need besides their plan (``_attnmask_*``
        attributes, forward hooks); nothing by default."""

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        hosts = self.hosts()
        for name in names:
            module = model.get_submodule(name)
            if type(module) in hosts:
                module.__class__ = hosts[type(module)]
            drop_attnmask_attributes(module)
        remove_attnmask_hooks(model)

    def patched_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention modules currently patched."""
        hosts = self.hosts()
        return [m for _, m in self.attention_modules(model) if type(m) in hosts]

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        """The patch grid of the model's configured input (``patch_embed.grid_size``)."""
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return (int(grid[0]), int(grid[1])) if grid is not None else None
