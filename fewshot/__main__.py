"""``python -m fewshot`` (also what ``torchrun -m fewshot`` runs)."""

from fewshot.cli import main

main()
