"""LoRA adapters on the base model: the PEFT format (peft_format.py)."""

# How the registry's refusal of one pin too many starts: the API answers it as a 400 on
# `pinned` (not `lora_path`). Here, not in registry.py, so the ingress imports no torch.
PIN_REFUSED = "cannot pin"
