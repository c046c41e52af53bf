"""`python -m mococxr` (used by `torchrun -m mococxr pretrain ...`)."""

from mococxr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
