"""Adapter files (LoRA, LyCORIS, full diffs): reading them and matching them to a base."""
