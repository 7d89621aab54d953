"""Fine-tuning Honeybee with transformers' Trainer and PEFT: `honeybee-finetune` (finetune.py), LLaVA-format data
with the official prompt and labels (data.py), and launcher configs for DDP, FSDP and DeepSpeed (configs/)."""
