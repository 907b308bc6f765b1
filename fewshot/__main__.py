"""``python -m fewshot`` (also what ``torchrun -m fewshot`` runs)."""

from fewshot.cli import main

if __name__ == "__main__":  # not when a decoding worker process (spawn) imports the parent's main module
    main()
