"""``portaserve devices``: every registered device, whether it can run here, and failed plugins.

For each device: the plugin that registered it, availability with the probe's reason, priority,
which ops are native (or overridden by a plugin) and which fall back to the reference, the
quant formats with a native kernel, and the KV cache dtypes it offers besides the compute
dtype (fp8). Then every plugin that failed to load, with its error.
``--json`` prints the same data for machines.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "devices", help="list devices, their availability and kernels, and failed plugins")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks of failures")
    parser.set_defaults(func=run)


def collect(registry: Any) -> dict[str, Any]:
    """The report as plain data: ``{"devices": [...], "failures": [...]}``."""
    devices = []
    chosen = None
    try:
        chosen = registry.select_device()[1]
    except Exception as e:  # the report lists why no device can run; it must not crash on it
        chosen = f"none: {e}"
    for entry in sorted(registry.devices.values(), key=lambda e: (-e.priority, e.name)):
        availability = entry.availability
        row: dict[str, Any] = {
            "name": entry.name,
            "plugin": entry.plugin,
            "available": availability.is_available,
            "reason": availability.reason,
            "error": availability.error,
            "priority": entry.priority,
        }
        row.update(_kernels(registry, entry) if availability.is_available else _declared(registry, entry))
        devices.append(row)
    failures = [{"plugin": f.plugin, "message": f.message, "traceback": f.traceback} for f in registry.failures]
    return {"devices": devices, "failures": failures, "selected": chosen}


def _kernels(registry: Any, entry: Any) -> dict[str, Any]:
    """Native / fallback ops from the device's resolved kernel table."""
    try:
        device = entry.cls(0)
        table = registry.kernel_table(device)
        caps = device.capabilities()
    except Exception as e:  # a device that cannot build its table is reported, not fatal
        return {"native_ops": [], "fallback_ops": [], "quant_formats": [],
                "dtypes": [], "kv_cache_dtypes": [], "kv_layout": None,
                "kernel_error": f"{type(e).__name__}: {e}"}
    native = [op if table.sources[op] == "native" else f"{op} ({table.sources[op]})"
              for op in table.native_ops]
    native += [op if source == "native" else f"{op} ({source})"  # optional fused ops it has
               for op, source in table.fused_sources.items() if source != "composed"]
    quant = sorted(set(table.quant_ops) | set(caps.quant_formats))
    return {
        "native_ops": native,
        "fallback_ops": table.fallback_ops,
        "quant_formats": quant,
        "dtypes": [str(d).removeprefix("torch.") for d in caps.dtypes],
        "kv_cache_dtypes": [str(d).removeprefix("torch.") for d in caps.kv_cache_dtypes],
        "kv_layout": caps.kv_layout,
    }


def _declared(registry: Any, entry: Any) -> dict[str, Any]:
    """An unavailable device is not instantiated; show only plugin overrides registered for it."""
    overrides = sorted(registry.kernel_overrides.get(entry.name, {}))
    quant = sorted(registry.quant_kernel_overrides.get(entry.name, {}))
    return {"native_ops": [f"{op} (plugin)" for op in overrides], "fallback_ops": [],
            "quant_formats": quant, "dtypes": [], "kv_cache_dtypes": [], "kv_layout": None}


def run(args: argparse.Namespace) -> int:
    from portaserve.plugins.manager import get_registry

    report = collect(get_registry())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_table(report, show_traceback=args.traceback)
    return 0


def _quant_cell(d: dict[str, Any]) -> str:
    cell = ", ".join(d["quant_formats"]) or "-"
    if d.get("kv_cache_dtypes"):
        cell += f"\nKV cache: {', '.join(d['kv_cache_dtypes'])}"
    return cell


def _print_table(report: dict[str, Any], show_traceback: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="portaserve devices", show_lines=True)
    for column in ("device", "plugin", "available", "priority", "native ops", "fallback ops",
                   "quant formats / KV cache"):
        table.add_column(column, overflow="fold")
    for d in report["devices"]:
        state = f"[green]yes[/green]: {d['reason']}" if d["available"] else f"[red]no[/red]: {d['reason']}"
        if d.get("kernel_error"):
            state += f"\n[red]kernel table: {d['kernel_error']}[/red]"
        table.add_row(
            d["name"], d["plugin"], state, str(d["priority"]),
            ", ".join(d["native_ops"]) or "-", ", ".join(d["fallback_ops"]) or "-",
            _quant_cell(d),
        )
    console.print(table)
    console.print(f"default device: {report['selected']}")
    if report["failures"]:
        failed = Table(title="plugins that failed to load", show_lines=True)
        failed.add_column("plugin")
        failed.add_column("error", overflow="fold")
        for f in report["failures"]:
            failed.add_row(f["plugin"], f["traceback"] if show_traceback and f["traceback"] else f["message"])
        console.print(failed)
        if not show_traceback:
            console.print("(--traceback shows where each failed)")
