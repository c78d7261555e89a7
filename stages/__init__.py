"""A declarative experiment pipeline for PyTorch vision models: the stage modules at the top
(one per DVC stage), libraries in sub-packages by topic, the console scripts in tools/."""
