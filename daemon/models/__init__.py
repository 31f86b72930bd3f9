"""The embedded default model repository (served when no --model-repository is given)."""
