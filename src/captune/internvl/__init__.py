"""InternVL2 releases as transformers' native model: release folders, the config and weight mapping, loading, the
tokenizer, LoRA adapters. Imports only captune's foundations (errors, fileio)."""
