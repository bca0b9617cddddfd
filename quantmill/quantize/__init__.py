"""Quantization math and the method handlers (torch): one handler module per method, sharing only the core modules
common, gptq_format and gptqmodel_backend (never another handler). quantmill.methods names each handler by import
path and never imports this package, so validating a profile loads no torch."""
