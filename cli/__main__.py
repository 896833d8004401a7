"""``python -m cli ...`` (also what ``torchrun -m cli finetune ...`` runs)."""

from cli.main import main

main()
