"""Entry point of ``python -m raymtl.tune``."""

from raymtl.cli import run_main
from raymtl.tune.cli import PROG, main

if __name__ == "__main__":
    run_main(main, PROG)
