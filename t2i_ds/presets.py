"""Run presets beyond the built-in ones (demo, experiment matrix); imported by the train command."""
