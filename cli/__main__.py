"""``python -m peft_export.cli ...`` (also what ``torchrun -m peft_export.cli finetune ...`` runs)."""

from peft_export.cli.main import main

main()
