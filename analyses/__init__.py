"""Analyses over stored archives (Hydra-composed; never load a language model)."""
