"""``python -m metatransfer`` (what torchrun launches) is the ``mtl`` command."""

from .cli import main

if __name__ == "__main__":
    main()
