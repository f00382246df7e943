"""Fine-tuning adapters applied to a network from outside it (LoRA); imports torch and safetensors only."""
