"""LoRA adapters on the base model: the PEFT format (peft_format.py)."""
