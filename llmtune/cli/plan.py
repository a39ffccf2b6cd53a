import json
from pathlib import Path
from typing import Annotated

import typer

from llmtune.cli.options import Overrides
from llmtune.plan import DEVICES  # the planner's table, imported without torch


def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML to plan.")],
    overrides: Overrides = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help=f"Plan for this device: {', '.join(DEVICES)}, or cpu (this machine, measured); default: the "
            "machine this runs on.",
        ),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(
            "--memory",
            help="Memory to fit in, e.g. 24GiB: whether the run fits, and else the smallest change that makes it "
            "fit. Without --device, a GPU with this much memory.",
        ),
    ] = None,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Devices the run trains on (DDP, or fsdp / deepspeed sharding).")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Peak memory per device and tokens/s of a recipe's training, from its model's config alone (no weights).

    Example: llmtune plan recipes/qlora.yaml --device rtx4090 --set training.batch_size=4
    """
    from dataclasses import replace

    from llmtune import plan as planner
    from llmtune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    if memory is not None and device is None:
        target = planner.DeviceInfo(f"a GPU with {memory}", planner.parse_memory(memory), 0.0, 0.0, 0.0)
    else:
        target = planner.device_info(device)
        if memory is not None:
            target = replace(target, memory=planner.parse_memory(memory))
    result = planner.plan_recipe(loaded, target, nproc)
    fix = None if result.fits else planner.propose_fix(result)
    if as_json:
        out = result.to_dict()
        if not result.fits:
            out["fix"] = None if fix is None else {"flags": fix[0], "total": fix[1].total}
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(result.table())
    if result.fits:
        return
    if fix is None:
        typer.echo(f"no single change makes it fit: {planner.no_fix_hint(result)}")
    else:
        flags, fixed = fix
        typer.echo(f"fits with: {planner.fix_command(recipe, overrides, flags)}  (peak {planner.gib(fixed.total)})")
