"""``python -m cpubone.train ...`` - the entry point for ``torchrun --nproc_per_node N -m cpubone.train``.

Takes the same arguments as ``cpubone train``.
"""
import argparse
import sys

from ..cli.train import add_train_arguments, run_train


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m cpubone.train",
                                     description="Train a model (same options as `cpubone train`).")
    add_train_arguments(parser)
    args = parser.parse_args()
    try:
        return run_train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"cpubone.train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
