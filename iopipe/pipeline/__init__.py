"""The builder API, config files and what a config may run."""
