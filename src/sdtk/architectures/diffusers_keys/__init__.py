"""Single-file <-> diffusers folder key maps, as data driven by each model's geometry.

- `links`: the Link table type (rename, 1x1 conv <-> linear, split/fuse, transpose, swap);
- `unet`, `vae`, `text`, `dit`: per-network link builders and config.json generators;
- `components`: one row per kind of component (links and config, either direction);
- `pipelines`: per family, the pipeline class, components, prefixes, tokenizers, scheduler;
- `plan`: links applied to lazy tensors (both ways, streaming, file spans kept);
- `assemble`: a whole single file split into components, and components joined back.
Pure functions over names, shapes and lazy tensors: nothing here opens a file.
"""
