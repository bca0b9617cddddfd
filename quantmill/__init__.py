"""quantmill: base model (+ LoRA) -> quantized, evaluated, registered variants."""

__version__ = "0.1.0"
