"""`peft train RECIPE`."""

from __future__ import annotations

from pathlib import Path

import typer

from peftcli.cli.recipe import SET_HELP


def train(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; load and train nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output.dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in output.dir."),
    launch: str | None = typer.Option(
        None,
        "--launch",
        help="Run on several processes with a preset: ddp, zero1, zero2, zero3, zero3_offload, "
        "fsdp2 (or an accelerate config file). Sets launch.preset.",
    ),  # fmt: skip
    nproc: int | None = typer.Option(None, "--nproc", help="Processes per machine (launch.nproc)."),
    nnodes: int | None = typer.Option(None, "--nnodes", help="Machines (launch.nnodes)."),
    node_rank: int | None = typer.Option(None, "--node-rank", help="This machine's index (launch.node_rank)."),
    main_address: str | None = typer.Option(None, "--main-address", help="Machine 0's address (launch.main_address)."),
    main_port: int | None = typer.Option(None, "--main-port", help="Machine 0's port (launch.main_port)."),
) -> None:
    """Fine-tune a model as the recipe says and write the adapter to output.dir."""
    from peftcli.cli.progress import print_plan
    from peftcli.recipe.load import load_recipe
    from peftcli.train.run_dir import check_output_dir

    flags = {"preset": launch, "nproc": nproc, "nnodes": nnodes, "node_rank": node_rank,
             "main_address": main_address, "main_port": main_port}  # fmt: skip
    overrides = [*overrides, *(f"launch.{key}={value}" for key, value in flags.items() if value is not None)]
    recipe = load_recipe(recipe_file, overrides)
    mode = check_output_dir(Path(recipe.output.dir), resume, overwrite)
    from peftcli.train.trackers import check_trackers_installed

    check_trackers_installed(recipe.training.report_to)  # a missing tracker is refused before any launch or load
    if mode == "resume":  # a change the checkpoint cannot follow is refused before anything starts
        from peftcli.recipe.load import recipe_to_dict
        from peftcli.train.resume_rules import check_resume_changes
        from peftcli.train.run_dir import RECIPE_FILE

        check_resume_changes(Path(recipe.output.dir) / RECIPE_FILE, recipe_to_dict(recipe))
    if dry_run:
        from peftcli.cli.targets import adapted_summary

        print_plan(recipe, mode, adapted_summary(recipe))  # unknown target modules are refused here
        return

    from peftcli.launch.run import accelerate_command, adopt_slurm_environment, outside_launcher, run_launcher

    if recipe.launch is not None and outside_launcher() is None:
        train_args = [str(recipe_file), *(arg for o in overrides for arg in ("--set", o))]
        train_args += ["--resume"] * resume + ["--overwrite"] * overwrite
        argv, env = accelerate_command(recipe.launch, train_args)
        typer.echo(f"launching through accelerate: {' '.join(argv[1:])}", err=True)
        status = run_launcher(argv, env)
        raise typer.Exit(status)
    adopt_slurm_environment()

    from peftcli.cli.progress import RichReporter
    from peftcli.train.loop import train as run

    run(recipe, resume=resume, overwrite=overwrite, reporter=RichReporter())
