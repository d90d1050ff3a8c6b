"""What keeps runs safe and inputs well-formed: option and folder checks, checkpoints, precision,
media decoding, the jsonl format, torchrun. cli.py and sources.py import no torch."""
