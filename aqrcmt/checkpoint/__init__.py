"""Checkpoint files: atomic safetensors/torch writers (io), the official state-dict layouts (manifest,
manifests/*.json), official <-> aqrcmt names (keymap), ``aqrcmt convert`` (convert) and ``aqrcmt inspect``."""
