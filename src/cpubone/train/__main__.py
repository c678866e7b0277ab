"""``python -m cpubone.train ...``: the entry point for ``torchrun --nproc_per_node N -m cpubone.train``.

The same command as ``cpubone train`` (its arguments are parsed by the command line package).
"""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
