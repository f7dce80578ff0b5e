"""``python -m lrdeploy.trainer`` runs ``lrdeploy train`` on its own, e.g. under torchrun:

    torchrun --nproc_per_node=2 -m lrdeploy.trainer --method lorita --arch lenet5 -o lenet_lorita.onnx

Errors and exit codes are those of ``lrdeploy``'s CLI (one line on stderr; LRDEPLOY_DEBUG=1 for tracebacks).
"""

from __future__ import annotations

import sys

from lrdeploy.cli.app import main as cli_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
