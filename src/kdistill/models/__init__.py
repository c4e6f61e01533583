"""Loading models (hub, folders, GGUF, `package:`), quantization, the compact teacher, from-teacher
students, LoRA, and what kdistill reads off a loaded model."""
