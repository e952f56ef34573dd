"""Launcher for a checkout: `python cli.py ...` or `torchrun --nproc_per_node=2 cli.py ...`.

The command itself lives in the library (`compsft.cli`), installed as the `compsft` console script.
"""
from compsft.cli import main

if __name__ == "__main__":
    main()
