"""``python -m lab.engine_sim``: the engine-sim command without the kvroute CLI."""

from lab.engine_sim import cli

if __name__ == "__main__":
    cli.command(prog_name="python -m lab.engine_sim")
