"""The plugin contract: every hook a portaserve plugin may implement (plugin API 1.0).

A plugin is a module (or any object) with functions decorated by ``@portaserve.hookimpl`` and a
module attribute ``PORTASERVE_PLUGIN_API = "1.0"``. Vendors expose it through the entry-point
group ``portaserve``; built-in devices and quant formats register through these same hooks.

Registration hooks receive a ``register`` callable and return None. They are called once each
time the registry is collected (at first use of ``portaserve.plugins.get_registry()``, and again
when a plugin is added or removed at run time), registration hooks first for devices, then for
kernels, quant methods and models. ``portaserve_select_device`` is the only choose-one hook.

New arguments are added the pluggy way: a hook implementation names only the arguments it
uses, so adding one here does not break existing plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("portaserve")


@hookspec
def portaserve_register_devices(register: Callable[[type], None]) -> None:
    """Register device backends.

    Called once per registry collection, before every other registration hook.

    :param register: call ``register(device_cls)`` with a subclass of
        ``portaserve.plugins.device.Device`` for each device the plugin provides. The class's
        ``name`` must be unique among registered devices and its ``api_version`` must have the
        major version of the running plugin API, or it is refused (and listed as a failure).
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def portaserve_register_kernels(register: Callable[..., None]) -> None:
    """Add or override single kernels on an existing device without replacing the device.

    Called once per registry collection, after ``portaserve_register_devices``. Kernels
    registered here win over the device's own native kernels when its kernel table is built.

    :param register: call ``register(device_name, op_name, fn, *, quant_format=None)``.
        ``op_name`` is one of ``portaserve.plugins.device.OP_NAMES`` or ``FUSED_OPS``; for
        ``"quant_linear"`` pass ``quant_format=<format name>`` to register the kernel for that
        weight format on that device; a quant kernel whose numerics are not the weight-only
        reference's (fp8 W8A8) says so with a ``quant_numerics`` attribute
        (``portaserve.quant.base``). The device need not be registered yet (its plugin may load
        later or not at all); the kernel is used once a device of that name builds its kernel
        table.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def portaserve_register_quant_methods(register: Callable[[Any], None]) -> None:
    """Register weight formats (quant methods).

    Called once per registry collection, after ``portaserve_register_kernels``.

    :param register: call ``register(method)`` with an object following
        ``portaserve.quant.base.QuantMethod``; ``method.name`` is the format name that
        ``QuantizedWeight.format`` and ``register(..., quant_format=...)`` refer to.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def portaserve_register_models(register: Callable[[str, type], None]) -> None:
    """Register model architectures.

    Called once per registry collection, after ``portaserve_register_quant_methods``.

    :param register: call ``register(architecture, model_cls)`` where ``architecture`` is the
        name found in a checkpoint (a Hugging Face ``config.json`` ``architectures`` entry such
        as ``"LlamaForCausalLM"``, or a GGUF ``general.architecture`` such as ``"llama"``).
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def portaserve_select_device(
    candidates: list[tuple[str, int]], requested: str | None
) -> str | None:
    """Choose the device when the user's request does not name a registered device.

    Called once per ``Registry.select_device`` call in two cases: the user named no device
    (no argument, no ``PORTASERVE_DEVICE``), or named one that no plugin registered (a plugin
    may resolve its own alias, e.g. ``"npu"`` to ``"acme-npu"``).
    Stops at first non-None result. A name that is not among the candidates is ignored with a
    warning.

    :param candidates: the available devices as ``(name, priority)``, highest priority first.
    :param requested: the unregistered device name the user asked for (without ``:index``),
        or None when the user asked for nothing.
    :returns: the name of one of the candidates, or None to leave the choice to others (and
        finally to the highest priority).

    .. versionadded:: 0.1
    """
